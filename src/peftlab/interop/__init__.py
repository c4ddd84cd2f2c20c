"""Interoperability with Hugging Face PEFT and transformers: export adapters in PEFT's format, import PEFT adapters,
and merge an adapter into a plain model folder. See :mod:`.export_peft`, :mod:`.import_peft` and :mod:`.merge`;
:mod:`.commands` adds the ``peftlab export|import|merge`` sub-commands."""
