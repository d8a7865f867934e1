"""The comparison chain's positive control: pretraining -> probes -> eval.compare must see a known effect.

A test of the instrument, not of ColorMAE: per paired seed, an encoder pretrained with random masks
(ratio 0.75) against the same initial weights without pretraining. The chain must report the
difference as beyond seed noise and in the expected direction; if it ever stops detecting it (a probe,
the pairing, the pretraining step or the t-test broken), this test fails. With the difference removed
(--epochs 0: no pretraining step, so both groups hold the same weights) it fails, as it must. The budget
is `--budget cpu`, the smallest tried where the effect shows on 2 CPU cores (docs/results.md, "How the
CPU budget was found"); its figures there are this test's (same settings, same code path).
"""

import re
from pathlib import Path

import pytest

from eval import compare, reproduce, seg_data
from eval.reproduce_report import UNTRAINED, samples_of

CONTROL = ["--budget", "cpu", "--masks", "random", "--seeds", "0,1,2", "--finetune-images", "0",
           "--device", "cpu"]  # fine-tuning, the slowest probe, is left out
METRIC = "knn"


@pytest.mark.slow  # 3 x 640 pretraining steps of a small MAE: a few minutes on 2 idle cores
@pytest.mark.skipif(not list(Path(seg_data.FASHION_MNIST_DIR).glob("*idx3-ubyte*")),
                    reason="Debian package dataset-fashion-mnist is not installed")
def test_the_chain_tells_a_pretrained_encoder_from_its_initial_weights(tmp_path):
    result = reproduce.main([*CONTROL, "--out", str(tmp_path / "control.md")])
    verdicts = compare.noise_verdicts(samples_of(result["runs"]), [METRIC], baseline=UNTRAINED)
    line = next(v for v in verdicts if v.startswith(f"- {METRIC}: random - {UNTRAINED} = "))
    difference = float(re.search(r"= ([+-][0-9.]+) \(mean per-seed difference\)", line).group(1))
    assert "paired t-test, since seeds 0, 1, 2 ran with both masks" in line, line
    assert "beyond seed noise" in line and difference > 0, line
    assert line in (tmp_path / "control.md").read_text()  # the page says what the test read
