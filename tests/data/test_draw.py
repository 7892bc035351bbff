"""Windows drawn in the child process equal the in-process ones; its ValueErrors come back as such."""
from __future__ import annotations

import pytest
import torch

from compress.data.draw import draw_windows
from compress.data.windows import calibration_windows, evaluation_windows


def test_child_windows_equal_in_process(model_dir, text_file, tiny_tokenizer):
    root = model_dir("llama")
    got = draw_windows(root, dict(source_spec=str(text_file), nsamples=5, seqlen=16, seed=2),
                       dict(source_spec=str(text_file), n_windows=3, seqlen=16))
    torch.testing.assert_close(got["calibration"], calibration_windows(tiny_tokenizer, str(text_file), 5, 16, 2), rtol=0, atol=0)
    torch.testing.assert_close(got["evaluation"], evaluation_windows(tiny_tokenizer, str(text_file), 3, 16), rtol=0, atol=0)


def test_child_value_error_is_a_value_error(model_dir, text_file):
    with pytest.raises(ValueError, match="evaluate.windows=100000"):
        draw_windows(model_dir("llama"), None, dict(source_spec=str(text_file), n_windows=100000, seqlen=16))
