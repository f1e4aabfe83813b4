"""Runs llama.cpp's own convert_hf_to_gguf.py on a tiny fixture base, reading the vocabulary as SentencePiece where
the model class's own vocabulary reader rejects the proof's tiny tokenizer.

`python convert_base.py LLAMA_CPP_TREE [convert_hf_to_gguf.py's arguments]`. The proof's bases carry a 64-piece
SentencePiece model (tests/gguf_proof/proof.py `tiny_tokenizer`). Many llama.cpp model classes read a BPE
tokenizer.json instead and refuse any whose pre-tokenizer hash they do not know (vendor/llama.cpp
conversion/base.py:1629-1953, `get_vocab_base_pre`). The vocabulary never reaches the logits, so the model class
picked by the converter (conversion/__init__.py:391-399, `get_model_class`) is replaced by a subclass that differs
in one method only: `set_vocab` runs the class's own, and where that raises, the base class's SentencePiece reader
(conversion/base.py:2081, `_set_vocab_sentencepiece`). The hyperparameters and every weight go through the class's
own `set_gguf_parameters` and `modify_tensors`, untouched. A class that can export multi-token-prediction layers is
told there are none, as the converter's own `--no-nextn` does (the tiny bases have none).
"""

from __future__ import annotations

import sys
from pathlib import Path


def _vocab_tolerant(model_class: type) -> type:
    def set_vocab(self) -> None:
        try:
            model_class.set_vocab(self)
        except Exception as exc:  # any refusal of the tiny tokenizer: an unknown BPE hash, no tokenizer.json, ...
            print(
                f"convert_base.py: {model_class.__name__}.set_vocab refused the tiny tokenizer ({exc!r}); "
                "reading it as SentencePiece",
                file=sys.stderr,
            )
            self._set_vocab_sentencepiece()

    namespace = {
        "set_vocab": set_vocab,
        "model_arch": model_class.model_arch,  # ModelBase.__init_subclass__ wants it in every class's own namespace
        "__module__": model_class.__module__,
    }
    if getattr(model_class, "supports_mtp_export", False):
        # what --no-nextn sets (convert_hf_to_gguf.py:276-281): the tiny bases have no multi-token-prediction layers,
        # which a class that can export them otherwise insists on (conversion/qwen.py:299-305)
        namespace["no_mtp"] = True
    return type(model_class.__name__, (model_class,), namespace)


def main(argv: list[str]) -> None:
    tree = Path(argv[0])
    sys.path[:0] = [str(tree), str(tree / "gguf-py")]
    sys.argv = [str(tree / "convert_hf_to_gguf.py"), *argv[1:]]
    import convert_hf_to_gguf as converter

    pick = converter.get_model_class
    converter.get_model_class = lambda name, mmproj=False: _vocab_tolerant(pick(name, mmproj=mmproj))
    converter.main()


if __name__ == "__main__":
    main(sys.argv[1:])
