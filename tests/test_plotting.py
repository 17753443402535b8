import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from PIL import Image

import ldm_tutorial as ldm


def test_grid_has_one_axis_per_cell():
    fig = ldm.show_images(torch.rand(5, 3, 8, 8), ncols=3)
    assert len(fig.axes) == 6
    assert sum(1 for ax in fig.axes if ax.images) == 5


def test_accepts_pil_arrays_and_signed_tensors():
    images = [Image.new("RGB", (8, 8)), np.zeros((8, 8, 3), np.uint8), torch.rand(3, 8, 8) * 2 - 1]
    fig = ldm.show_images(images, captions=["pil", "array", "tensor"])
    assert [ax.get_title() for ax in fig.axes] == ["pil", "array", "tensor"]


def test_signed_tensor_maps_minus_one_to_black():
    t = torch.full((1, 3, 2, 2), -1.0)
    t[0, :, 0, 0] = 1.0
    (arr,) = ldm.plotting.to_uint8_images(t)
    assert arr[0, 0].tolist() == [255, 255, 255] and arr[1, 1].tolist() == [0, 0, 0]


@pytest.mark.parametrize("bad", [torch.full((3, 4, 4), 2.0), torch.full((3, 4, 4), -1.5)])
def test_out_of_range_tensor_raises_naming_parameter(bad):
    with pytest.raises(ValueError, match=r"images .*\[-1, 1\] or \[0, 1\]"):
        ldm.show_images(bad)


def test_bad_shapes_and_dtypes_raise():
    with pytest.raises(ValueError, match="images"):
        ldm.show_images(torch.rand(4, 8, 8))  # 4 channels
    with pytest.raises(ValueError, match=r"images\[0\].*uint8"):
        ldm.show_images([np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(ValueError, match="captions"):
        ldm.show_images(torch.rand(2, 3, 8, 8), captions=["only one"])


def test_overlay_heatmap_and_curves():
    fig = ldm.overlay_heatmap(torch.rand(3, 16, 16), torch.rand(4, 4), alpha=0.4)
    assert len(fig.axes[0].images) == 2
    with pytest.raises(ValueError, match="heat"):
        ldm.overlay_heatmap(torch.rand(3, 16, 16), torch.rand(4))
    fig = ldm.plot_curves({"a": [1, 10, 100], "b": ([0, 1], [5, 6])}, "x", "y", logy=True)
    assert fig.axes[0].get_yscale() == "log" and len(fig.axes[0].lines) == 2


def _slider_frames(html_text):
    import base64
    import io
    import json
    import re

    frames = json.loads(re.search(r"var frames = (\[.*?\]), labels", html_text).group(1))
    labels = json.loads(re.search(r"labels = (\[.*?\]);", html_text).group(1))
    decoded = [np.asarray(Image.open(io.BytesIO(base64.b64decode(f.split(",", 1)[1]))).convert("RGB"))
               for f in frames]
    return decoded, labels


def test_slider_embeds_every_frame_losslessly_with_its_label():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    html_text = ldm.slider_html(images, ["w = 1", "w = 5", "</script> w = 9"])
    frames, labels = _slider_frames(html_text)
    assert labels == ["w = 1", "w = 5", "</script> w = 9"]
    for got, want in zip(frames, ldm.plotting.to_uint8_images(images)):
        assert np.array_equal(got, want)
    assert html_text.count("</script>") == 1          # a label cannot close the script early
    assert 'max="2"' in html_text and "://" not in html_text   # no URL: nothing to fetch


def test_slider_refuses_a_label_count_that_does_not_match():
    with pytest.raises(ValueError, match="labels must name each of the 2 frames, got 1"):
        ldm.slider_html(torch.zeros(2, 3, 8, 8), ["one"])
    with pytest.raises(ValueError, match="width must be a positive int"):
        ldm.slider_html(torch.zeros(1, 3, 8, 8), ["one"], width=0)
