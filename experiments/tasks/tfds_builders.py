"""TFDS builders for GSM8K and MATH that work without tensorflow and without huggingface_hub.

tfds's own ``huggingface:gsm8k/main`` needs the network even for its metadata, so the project
defines its builders. Importing this module registers them with tfds under the names
``distgame_gsm8k`` and ``distgame_math``; they are read with ``tfds.data_source`` (array_record).

Sources (downloaded by ``download_and_prepare`` when a network exists; or put the same files into
``<data_dir>/downloads/manual/`` to prepare offline):

- GSM8K: OpenAI's release, https://github.com/openai/grade-school-math,
  ``grade_school_math/data/{train,test}.jsonl`` (7473 / 1319 problems), each line
  ``{"question": ..., "answer": "... #### 72"}``.
- MATH: Hendrycks et al.'s release tarball ``MATH.tar`` (https://people.eecs.berkeley.edu/~hendrycks/MATH.tar,
  linked from https://github.com/hendrycks/math), ``MATH/{train,test}/<subject>/<id>.json``
  (7500 / 5000 problems), each ``{"problem", "level", "type", "solution"}``; the reference answer is
  the solution's last ``\\boxed{}``. Manual copies may be ``MATH.tar`` or the extracted ``MATH/`` folder.
"""

from __future__ import annotations

import json
import tarfile

import tensorflow_datasets as tfds
from etils import epath

from experiments.tasks.answers import GSM8K_MARKER, last_boxed

GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{split}.jsonl"
MATH_URL = "https://people.eecs.berkeley.edu/~hendrycks/MATH.tar"


# Files are opened through etils.epath, so a gs:// data_dir works without tensorflow (via gcsfs).


def _manual_dir(dl_manager) -> epath.Path | None:
    """The manual-download folder if the user filled it, else None (then we download)."""
    try:
        return epath.Path(dl_manager.manual_dir)
    except (AssertionError, ValueError):
        return None


def gsm8k_final_answer(solution: str) -> str:
    """The text after the last ``####`` of a GSM8K solution, commas removed (``"1,000"`` -> ``"1000"``)."""
    return solution.rsplit(GSM8K_MARKER, 1)[-1].strip().replace(",", "")


def _tar_members(path, split: str):
    """(name, bytes) of ``MATH/<split>/*/*.json`` in the tarball; Python's tarfile, since
    ``dl_manager.iter_archive`` goes through tf.io.gfile and so needs tensorflow."""
    with epath.Path(path).open("rb") as f, tarfile.open(fileobj=f) as tar:
        for member in tar:
            if member.isfile() and f"/{split}/" in member.name and member.name.endswith(".json"):
                yield member.name, tar.extractfile(member).read()


class DistgameGsm8k(tfds.core.GeneratorBasedBuilder):
    """Grade-school math word problems (OpenAI GSM8K) with step-by-step solutions ending in ``#### <answer>``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "OpenAI grade-school-math train/test jsonl."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Optional: place train.jsonl and test.jsonl from openai/grade-school-math here."

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict(
                {"question": tfds.features.Text(), "solution": tfds.features.Text(), "answer": tfds.features.Text()}
            ),
            homepage="https://github.com/openai/grade-school-math",
        )

    def _split_generators(self, dl_manager):
        manual = _manual_dir(dl_manager)
        if manual is not None:
            paths = {s: manual / f"{s}.jsonl" for s in ("train", "test")}
        else:
            paths = dl_manager.download({s: GSM8K_URL.format(split=s) for s in ("train", "test")})
        return {s: self._generate_examples(p) for s, p in paths.items()}

    def _generate_examples(self, path):
        with epath.Path(path).open("r", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                row = json.loads(line)
                yield (
                    i,
                    {
                        "question": row["question"],
                        "solution": row["answer"],
                        "answer": gsm8k_final_answer(row["answer"]),
                    },
                )


class DistgameMath(tfds.core.GeneratorBasedBuilder):
    """Competition mathematics problems (Hendrycks et al. MATH) with LaTeX solutions ending in ``\\boxed{}``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Hendrycks MATH.tar, train/test."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Optional: place MATH.tar (or its extracted MATH/ folder) here."

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "problem": tfds.features.Text(),
                    "solution": tfds.features.Text(),
                    "answer": tfds.features.Text(),
                    "level": tfds.features.Text(),
                    "type": tfds.features.Text(),
                }
            ),
            homepage="https://github.com/hendrycks/math",
        )

    def _split_generators(self, dl_manager):
        manual = _manual_dir(dl_manager)
        if manual is not None and (manual / "MATH").is_dir():

            def files(split):
                return ((str(p), p.read_bytes()) for p in sorted((manual / "MATH" / split).glob("*/*.json")))
        else:
            tar = manual / "MATH.tar" if manual is not None else dl_manager.download(MATH_URL)

            def files(split):
                return _tar_members(tar, split)

        return {s: self._generate_examples(files(s)) for s in ("train", "test")}

    def _generate_examples(self, files):
        for name, data in files:
            row = json.loads(data.decode("utf-8"))
            yield (
                name,
                {
                    "problem": row["problem"],
                    "solution": row["solution"],
                    "answer": last_boxed(row["solution"]) or "",
                    "level": row.get("level", ""),
                    "type": row.get("type", ""),
                },
            )
