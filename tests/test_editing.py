"""The editing helpers: each input rule of ldm_tutorial.editing, and img2img/inpaint against diffusers."""
import re

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor

import ldm_tutorial as ldm
from ldm_tutorial import editing
from ldm_tutorial.tinysd import parser, shapes


def _rgb_u8(h=16, w=24, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _independent(u8_hwc):
    """0..255 HWC -> (1, 3, H, W) in [-1, 1], computed in numpy."""
    return torch.from_numpy(u8_hwc.astype(np.float64).transpose(2, 0, 1)[None] / 127.5 - 1).float()


def _notes(fn, *args, **kwargs):
    notes = []
    out = fn(*args, notes=notes, **kwargs)
    return out, notes


# ---- as_image ------------------------------------------------------------------------------------

def test_uint8_hwc_array_and_pil_rgb_scale_from_0_255_without_a_note():
    a = _rgb_u8()
    for image in (a, PIL.Image.fromarray(a), torch.from_numpy(a).permute(2, 0, 1)):
        out, notes = _notes(editing.as_image, image)
        assert out.dtype == torch.float32 and out.shape == (1, 3, 16, 24)
        torch.testing.assert_close(out, _independent(a), rtol=0, atol=1e-6)
        assert notes == []
    assert float(editing.as_image(np.full((8, 8, 3), 255, np.uint8)).min()) == 1.0
    assert float(editing.as_image(np.zeros((8, 8, 3), np.uint8)).max()) == -1.0


def test_batches_and_layouts_agree():
    a, b = _rgb_u8(seed=1), _rgb_u8(seed=2)
    want = torch.cat([_independent(a), _independent(b)])
    stacked = np.stack([a, b])                                  # (B, H, W, 3)
    chw = torch.from_numpy(stacked).permute(0, 3, 1, 2)         # (B, 3, H, W)
    for image in (stacked, chw, [a, b], [PIL.Image.fromarray(a), PIL.Image.fromarray(b)]):
        torch.testing.assert_close(editing.as_image(image), want, rtol=0, atol=1e-6)
    x = torch.rand(3, 16, 24) * 2 - 1                            # (3, H, W) floats pass through
    torch.testing.assert_close(editing.as_image(x), x[None])


def test_rgba_alpha_is_composited_over_white_and_named():
    a = np.zeros((8, 16, 4), np.uint8)
    a[..., 0] = 200                                             # red stored under every pixel
    a[:, :8, 3] = 255                                           # left half opaque, right half clear
    a[:, 8:, 3] = 0
    a[0, 0, 3] = 128                                            # one half-transparent pixel
    im = PIL.Image.fromarray(a, "RGBA")
    out, notes = _notes(editing.as_image, im)
    white = PIL.Image.new("RGBA", im.size, (255, 255, 255, 255))
    ref = np.asarray(PIL.Image.alpha_composite(white, im).convert("RGB"))
    torch.testing.assert_close(out, _independent(ref), rtol=0, atol=1.01 / 127.5)   # PIL rounds
    assert torch.equal(out[0, :, :, 8:], torch.ones(3, 8, 8))   # clear pixels are white, exactly
    assert len(notes) == 1 and "'RGBA'" in notes[0] and "white" in notes[0] and "65 of 128" in notes[0]
    dropped = VaeImageProcessor().preprocess(im)                # diffusers keeps the hidden colour
    assert float(dropped[0, 1:, :, 8:].max()) == -1.0           # green, blue 0: the clear half is red


@pytest.mark.parametrize("mode", ["L", "P", "1", "CMYK"])
def test_other_modes_convert_like_pil_and_name_the_mode(mode):
    im = PIL.Image.fromarray(_rgb_u8()).convert(mode)
    out, notes = _notes(editing.as_image, im)
    torch.testing.assert_close(out, _independent(np.asarray(im.convert("RGB"))), rtol=0, atol=1e-6)
    assert notes == [f"image: PIL mode {mode!r} converted to RGB"]
    if mode == "L":
        assert torch.equal(out[0, 0], out[0, 1]) and torch.equal(out[0, 1], out[0, 2])


def test_a_mode_with_more_than_8_bits_is_refused():
    im = PIL.Image.fromarray(np.zeros((8, 8), np.int32), "I")
    with pytest.raises(ValueError, match=r"^image: PIL mode 'I' is not an 8-bit image"):
        editing.as_image(im)


def test_float_ranges():
    with pytest.raises(ValueError, match=re.escape("image: float images must be in [-1, 1], found range "
                                                   "[-2, 1.5]")):
        editing.as_image(torch.tensor([-2.0, 1.5]).repeat(3, 8, 4))
    with pytest.raises(ValueError, match=r"found range \[0, 255\] \(0\.\.255 values\? pass them as uint8\)"):
        editing.as_image(torch.tensor([0.0, 255.0]).repeat(3, 8, 4))
    with pytest.raises(ValueError, match="^image holds NaN or infinite values$"):
        editing.as_image(torch.full((3, 8, 8), float("nan")))
    x = torch.rand(1, 3, 8, 8) * 0.5 + 0.25                     # a [0, 1]-looking image
    out, notes = _notes(editing.as_image, x)
    assert torch.equal(out, x)                                  # read as [-1, 1], unchanged
    assert len(notes) == 1 and "image * 2 - 1" in notes[0]
    with pytest.warns(UserWarning, match=r"read as \[-1, 1\]"):
        editing.as_image(x)


def test_integer_images_outside_0_255_and_bool_images_are_refused():
    with pytest.raises(ValueError, match=re.escape("image: integer images must hold 0..255, found range "
                                                   "[0, 300]")):
        editing.as_image(np.array([0, 300]).repeat(96).reshape(8, 8, 3))
    with pytest.raises(ValueError, match="dtype torch.bool"):
        editing.as_image(torch.zeros(3, 8, 8, dtype=torch.bool))


def test_four_channels_are_refused_because_diffusers_reads_them_as_latents():
    rgba = torch.rand(1, 4, 16, 16) * 2 - 1
    with pytest.raises(ValueError, match=r"shape \(1, 4, 16, 16\) \(4 channels: diffusers would take "
                                         r"this for latents"):
        editing.as_image(rgba)
    assert VaeImageProcessor().preprocess(rgba).shape == (1, 4, 16, 16)   # passed through, no VAE
    with pytest.raises(ValueError, match=r"got shape \(8, 8, 4\) \(4 channels"):
        editing.as_image(np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match=r"got shape \(1, 16, 16, 3\) \(channels last\?"):
        editing.as_image(torch.zeros(1, 16, 16, 3))
    with pytest.raises(ValueError, match=r"^image must be a PIL image, a numpy array or a torch tensor, "
                                         r"got str$"):
        editing.as_image("cat.png")


def test_sizes_not_divisible_by_8_are_refused_with_the_nearest_valid_sizes():
    with pytest.raises(ValueError, match=re.escape("image is 130x100 (height x width); both must be "
                                                   "multiples of 8 (the VAE's downsampling factor): crop or "
                                                   "resize it to 128x96 or 128x104 or 136x96 or 136x104")):
        editing.as_image(np.zeros((130, 100, 3), np.uint8))
    with pytest.raises(ValueError, match=r"resize it to 8x16$"):
        editing.as_image(np.zeros((5, 16, 3), np.uint8))
    assert editing.as_image(np.zeros((12, 12, 3), np.uint8), multiple=4).shape == (1, 3, 12, 12)
    with pytest.raises(ValueError, match=r"^mine: every image of a batch must have one size"):
        editing.as_image([np.zeros((8, 8, 3), np.uint8), np.zeros((16, 8, 3), np.uint8)], name="mine")


# ---- as_mask -------------------------------------------------------------------------------------

def _diffusers_mask(pil_l):
    """What StableDiffusionInpaintPipeline's own mask processor makes of a PIL "L" mask."""
    proc = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    return proc.preprocess(pil_l, height=pil_l.height, width=pil_l.width)


def test_mask_kinds_agree_and_white_is_one():
    m = np.zeros((16, 24), np.uint8)
    m[4:12, 8:20] = 255
    want = torch.from_numpy(m[None, None] / 255.0).float()
    for mask in (m, PIL.Image.fromarray(m), PIL.Image.fromarray(m).convert("1"), m > 0,
                 torch.from_numpy(m > 0), torch.from_numpy(m / 255.0), m[..., None], m[None, None]):
        out, notes = _notes(editing.as_mask, mask, (16, 24))
        assert torch.equal(out, want) and notes == []
    torch.testing.assert_close(editing.as_mask(PIL.Image.fromarray(m), (16, 24)),
                               _diffusers_mask(PIL.Image.fromarray(m)))


def test_soft_masks_are_thresholded_at_half_as_diffusers_does():
    ramp = np.tile(np.linspace(0, 255, 24).round().astype(np.uint8), (16, 1))
    out, notes = _notes(editing.as_mask, PIL.Image.fromarray(ramp), (16, 24))
    torch.testing.assert_close(out, _diffusers_mask(PIL.Image.fromarray(ramp)))
    assert set(out.unique().tolist()) == {0.0, 1.0}
    assert notes == [f"mask: {16 * 22} soft mask values thresholded at 0.5 (< 0.5 keep, >= 0.5 repaint), "
                     f"as diffusers' mask processor does"]
    assert float(editing.as_mask(torch.full((8, 8), 0.5), (8, 8), notes=[]).min()) == 1.0
    assert float(editing.as_mask(torch.full((8, 8), 0.499), (8, 8), notes=[]).max()) == 0.0


def test_bad_masks_name_the_parameter_and_what_was_seen():
    with pytest.raises(ValueError, match=re.escape("mask is 64x64 (shape (64, 64)) but the image is 128x128")):
        editing.as_mask(np.zeros((64, 64), np.uint8), (128, 128))
    with pytest.raises(ValueError, match=re.escape("mask is 128x64 (shape (1, 1, 128, 64)) but the image")):
        editing.as_mask(torch.zeros(1, 1, 128, 64), (128, 128))
    with pytest.raises(ValueError, match="holding only 0 and 1 is ambiguous"):
        editing.as_mask(np.eye(8, dtype=np.uint8), (8, 8))
    with pytest.raises(ValueError, match=re.escape("mask: float masks must be in [0, 1] (1 = repaint), "
                                                   "found range [-1, 1]")):
        editing.as_mask(torch.linspace(-1, 1, 64).reshape(8, 8), (8, 8))
    with pytest.raises(ValueError, match=re.escape("mask: integer masks must hold 0..255, found range "
                                                   "[0, 256]")):
        editing.as_mask(np.array([[0, 256]]), (1, 2))
    with pytest.raises(ValueError, match="got mode 'RGB'; use mask.convert"):
        editing.as_mask(PIL.Image.new("RGB", (8, 8)), (8, 8))
    with pytest.raises(ValueError, match=re.escape("got shape (2, 3, 8, 8)")):
        editing.as_mask(torch.zeros(2, 3, 8, 8), (8, 8))
    with pytest.raises(ValueError, match="^size must be"):
        editing.as_mask(torch.zeros(8, 8), 8)


def test_strength_rule_and_steps_arithmetic():
    assert editing.as_strength(0) == 0.0 and editing.as_strength(1) == 1.0
    for bad, seen in ((1.3, "1.3"), (-0.1, "-0.1"), (float("nan"), "nan"), ("0.5", "'0.5'")):
        with pytest.raises(ValueError, match=re.escape(f"strength must be a finite number in [0.0, 1.0], "
                                                       f"got {seen}")):
            editing.as_strength(bad)
    assert [editing.steps_run(25, s) for s in (0, 0.039, 0.04, 0.5, 0.99, 1)] == [0, 0, 1, 12, 24, 25]


# ---- img2img and inpaint against the real pipelines ------------------------------------------------

@pytest.fixture(scope="module")
def img2img_pipe():
    return ldm.load_pipeline("tiny", task="img2img", verbose=False)


@pytest.fixture(scope="module")
def inpaint_pipe():
    return ldm.load_pipeline("tiny", task="inpaint", verbose=False)


@pytest.fixture(scope="module")
def scene():
    return shapes.render(shapes.sample_scenes(1, seed=10_000, n_objects=1))


def test_img2img_equals_the_pipeline_and_runs_the_last_steps(img2img_pipe, scene):
    pipe = img2img_pipe
    out = ldm.img2img(pipe, scene, "a big blue circle in the middle", strength=0.5, num_inference_steps=6,
                      generator=torch.Generator().manual_seed(3))
    ref = pipe("a big blue circle in the middle", image=(scene + 1) / 2, strength=0.5, num_inference_steps=6,
               generator=torch.Generator().manual_seed(3), output_type="pt").images * 2 - 1
    torch.testing.assert_close(out.images, ref)
    pipe.scheduler.set_timesteps(6)
    expected, n = pipe.get_timesteps(6, 0.5, "cpu")
    assert out.timesteps == [int(t) for t in expected] and n == 3 == out.steps_run
    assert out.notes[-1] == f"ran 3 of 6 steps, from t={int(expected[0])} down to t={int(expected[-1])}"


def test_img2img_strength_zero_is_the_vae_round_trip_where_diffusers_fails(img2img_pipe, scene):
    pipe = img2img_pipe
    with pytest.raises(RuntimeError):                           # diffusers' own behaviour at 0 steps
        pipe("a red square", image=(scene + 1) / 2, strength=0.0, num_inference_steps=6, output_type="pt")
    out = ldm.img2img(pipe, scene, "a red square", strength=0.1, num_inference_steps=6)   # int(0.6) = 0
    with torch.no_grad():
        ref = pipe.vae.decode(pipe.vae.encode(scene).latent_dist.mean).sample.clamp(-1, 1)
    torch.testing.assert_close(out.images, ref)
    assert out.timesteps == [] and "int(6 * 0.1) = 0 denoising steps" in out.notes[0]


def test_img2img_refuses_bad_inputs_before_diffusers(img2img_pipe, inpaint_pipe, scene):
    with pytest.raises(ValueError, match="^pipe must be a StableDiffusionImg2ImgPipeline .* got "
                                         "StableDiffusionInpaintPipeline$"):
        ldm.img2img(inpaint_pipe, scene, "a red square")
    with pytest.raises(ValueError, match="^strength must be a finite number in"):
        ldm.img2img(img2img_pipe, scene, "a red square", strength=2)
    with pytest.raises(ValueError, match="^num_inference_steps must be a positive integer, got 0$"):
        ldm.img2img(img2img_pipe, scene, "a red square", num_inference_steps=0)
    with pytest.raises(ValueError, match=r"^image: 2 images and 3 prompts"):
        ldm.img2img(img2img_pipe, scene.repeat(2, 1, 1, 1), ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"4 channels: diffusers would take this for latents"):
        ldm.img2img(img2img_pipe, torch.zeros(1, 4, 128, 128), "a red square")


def test_inpaint_equals_the_pipeline_and_white_means_repaint(inpaint_pipe, scene):
    pipe = inpaint_pipe
    mask = torch.zeros(128, 128)
    mask[32:96, 32:96] = 1                                      # white square = repaint
    kw = dict(num_inference_steps=6, generator=torch.Generator().manual_seed(5))
    out = ldm.inpaint(pipe, scene, mask, "a big red circle in the middle", **kw)
    ref = pipe("a big red circle in the middle", image=(scene + 1) / 2, mask_image=mask[None, None],
               num_inference_steps=6, generator=torch.Generator().manual_seed(5), output_type="pt").images * 2 - 1
    torch.testing.assert_close(out.images, ref)
    assert pipe.unet.config.in_channels == 9 and "9-channel" in out.notes[0]
    with torch.no_grad():
        round_trip = pipe.vae.decode(pipe.vae.encode(scene).latent_dist.mean).sample.clamp(-1, 1)
    inverted = ldm.inpaint(pipe, scene, 1 - mask, "a big red circle in the middle", num_inference_steps=6,
                           generator=torch.Generator().manual_seed(5))
    inside = mask.bool()[None, None].expand_as(scene)

    def change(images, where):
        return float((images - round_trip).abs()[where].mean())

    # the square changes 5x more when it is white (0.30 against 0.06 mean |difference| on this seed)
    assert change(out.images, inside) > 3 * change(inverted.images, inside)


def test_inpaint_checks_the_mask_against_the_image(inpaint_pipe, img2img_pipe, scene):
    with pytest.raises(ValueError, match=re.escape("mask is 16x16 (shape (16, 16)) but the image is 128x128")):
        ldm.inpaint(inpaint_pipe, scene, torch.ones(16, 16), "a red square")
    with pytest.raises(ValueError, match="^mask: 2 masks for 1 images"):
        ldm.inpaint(inpaint_pipe, scene, torch.ones(2, 128, 128), "a red square")
    with pytest.raises(ValueError, match="^pipe must be a StableDiffusionInpaintPipeline"):
        ldm.inpaint(img2img_pipe, scene, torch.ones(128, 128), "a red square")
    with pytest.raises(ValueError, match="^padding_mask_crop must be a positive integer, got 0$"):
        ldm.inpaint(inpaint_pipe, scene, torch.ones(128, 128), "a red square", padding_mask_crop=0)


def test_padding_mask_crop_keeps_the_outside_of_the_crop_box(inpaint_pipe, scene):
    mask = torch.zeros(128, 128)
    mask[56:72, 56:72] = 1
    out = ldm.inpaint(inpaint_pipe, scene, mask, "a small red circle in the middle", num_inference_steps=4,
                      generator=torch.Generator().manual_seed(0), padding_mask_crop=8)
    box = re.search(r"\(x1, y1, x2, y2\) = \((\d+), (\d+), (\d+), (\d+)\)", out.notes[1])
    x1, y1, x2, y2 = map(int, box.groups())
    assert (x1, y1, x2, y2) == (48, 48, 80, 80)                 # the mask's box grown by 8 on each side
    outside = torch.ones(128, 128, dtype=torch.bool)
    outside[y1:y2, x1:x2] = False
    err = (out.images[0][:, outside] - scene[0][:, outside]).abs().max()
    assert float(err) <= 1 / 127.5 + 1e-6                       # the original, up to 8-bit rounding


# ---- the chapter's measures ----------------------------------------------------------------------

def test_gradient_energy_and_border_band_on_drawn_images():
    step = torch.zeros(1, 3, 8, 8)
    step[..., 4:] = 1.0                                         # a vertical edge between columns 3 and 4
    g = editing.gradient_energy(step)
    assert torch.equal(g[0, :, 3], torch.ones(8)) and float(g.sum()) == 8.0
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    band = editing.border_band(mask, 1)
    # within 1 px of the square's border: the 10x10 ring outside minus the 6x6 inside
    assert int(band.sum()) == 10 * 10 - 6 * 6
    assert not band[0, 8, 8] and band[0, 4, 4] and band[0, 3, 8] and not band[0, 2, 8]


def test_seam_ratio_sees_an_edge_at_the_border_and_not_a_texture_across_it():
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    rng = torch.Generator().manual_seed(0)
    texture = torch.rand(1, 3, 32, 32, generator=rng) * 0.2     # stationary noise
    pasted = texture + 0.8 * mask                               # the same noise, a step at the border
    ratio_texture = float(editing.seam_ratio(texture, mask))
    ratio_seam = float(editing.seam_ratio(pasted, mask))
    assert 0.7 < ratio_texture < 1.4 and ratio_seam > 5
    canvas = torch.linspace(-1, 1, 64).repeat(1, 3, 32, 1)      # a smooth ramp, 64 wide
    assert editing.border_continuity(canvas, 32) == pytest.approx(1.0, rel=1e-4)
    canvas[..., 32:] += 0.5                                     # a step at column 32
    assert editing.border_continuity(canvas, 32) > 100


def test_object_mask_follows_the_parser_box_on_the_latent_grid():
    scene = shapes.Scene([shapes.SceneObject("red", "square", "small", "centre")])
    image = shapes.render([scene])
    (obj,) = [o.box for o in parser.parse_scene(image[0])]
    m = editing.object_mask(image, margin=6)
    ys, xs = torch.nonzero(m[0, 0], as_tuple=True)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    assert all(v % 8 == 0 for v in (y0, y1, x0, x1))
    assert x0 <= obj[0] - 6 and y0 <= obj[1] - 6 and x1 >= obj[2] + 6 and y1 >= obj[3] + 6
    assert x0 > obj[0] - 14 and x1 < obj[2] + 14                # no more than the grid adds
    assert int(m.sum()) == (y1 - y0) * (x1 - x0)
    with pytest.raises(ValueError, match="^index: the parser found 1 objects, asked for object 1$"):
        editing.object_mask(image, index=1)


def test_edit_targets_change_only_the_named_attributes():
    scenes = editing.sweep_scenes(6)
    for kind, changed in (("recolour", {"colour"}), ("replace", {"colour", "shape"})):
        for s, t in zip(scenes, editing.edit_targets(scenes, kind)):
            a, b = s.objects[0], t.objects[0]
            diff = {k for k in ("colour", "shape", "size", "position") if getattr(a, k) != getattr(b, k)}
            assert diff == changed and s.objects[1:] == t.objects[1:]
            assert (s.background, s.bg_seed) == (t.background, t.bg_seed)
    assert [len(s.objects) for s in scenes] == [1] * 6 + [2] * 6


def test_outpaint_and_blending_refuse_what_they_cannot_do(inpaint_pipe, scene):
    with pytest.raises(ValueError, match="^new_width must be a multiple of 8 above the image's width 128, got 196$"):
        editing.outpaint(inpaint_pipe, scene, "a red square", 196)
    with pytest.raises(ValueError, match="^step must be a multiple of 8 below 128 that divides new_width - "
                                         "width = 64, got 48$"):
        editing.outpaint(inpaint_pipe, scene, "a red square", 192, step=48)
    with pytest.raises(ValueError, match="^pipe must have a 4-channel text-to-image U-Net .* got 9"):
        editing.blending_pipeline(inpaint_pipe)


def test_outpaint_keeps_the_source_and_widens(inpaint_pipe, scene):
    canvas, borders = editing.outpaint(inpaint_pipe, scene, "a red square", 160, step=16,
                                       num_inference_steps=2)
    assert canvas.shape == (1, 3, 128, 160) and borders == [128, 144]
    assert torch.equal(canvas[..., :128], scene)


# ---- the sweep's helpers and its CLI (mutation-testing follow-ups, benchmarks/mutation.md) -------
def test_seam_energy_of_an_edge_on_the_border_is_its_share_of_the_band():
    """An 8x8 image, dark left half, bright right half, masked left half: the only gradient is the
    forward difference at column 3 (1 in every channel); the 2-px band holds columns 2..5."""
    images = torch.zeros(1, 3, 8, 8)
    images[..., 4:] = 1.0
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    assert editing.seam_energy(images, mask).tolist() == [8 / 32]
    assert editing.seam_energy(images, mask, width=1).tolist() == [8 / 16]   # columns 3..4
    assert editing.seam_energy(torch.zeros(2, 3, 8, 8), mask.expand(2, 1, 8, 8)).tolist() == [0.0, 0.0]


def test_inpaint_targets_replace_the_object_the_mask_covers_and_list_it_first():
    scenes = [s for s in editing.sweep_scenes(3) if len(s.objects) == 2]
    images = shapes.render(scenes)
    targets = editing.inpaint_targets(scenes, images)
    assert len(targets) == len(scenes) == 3
    for scene, image, target in zip(scenes, images, targets):
        big = parser.parse_scene(image)[0]                       # the object object_mask covers
        new, kept = target.objects
        old = next(o for o in scene.objects if o.position == big.position)
        other = next(o for o in scene.objects if o is not old)
        assert (new.position, new.size) == (old.position, old.size)
        assert new.colour != old.colour and new.shape != old.shape
        assert kept == other
    again = editing.inpaint_targets(scenes, images)
    assert [t.objects for t in again] == [t.objects for t in targets]          # seeded
    other_seed = editing.inpaint_targets(scenes, images, seed=1)
    assert [t.objects for t in other_seed] != [t.objects for t in targets]


def test_the_committed_page_is_the_markdown_of_the_committed_result():
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "benchmarks" / "image_editing.md"
    assert editing.markdown(ldm.results.load("image_editing")) == page.read_text()


def test_the_cli_writes_the_sweep_as_json_with_nan_as_null_and_its_page(tmp_path, monkeypatch, capsys):
    import json

    committed = ldm.results.load("image_editing")
    result = json.loads(json.dumps(committed))
    result["meta"]["load_average_end"] = float("nan")             # a median over an empty band, say
    calls = []
    monkeypatch.setattr(editing, "run_sweep", lambda *a: calls.append(a) or result)
    threads = torch.get_num_threads()
    try:
        editing.main(["--sweep", "--n-strength", "2", "--n-inpaint", "3", "--n-outpaint", "1", "--steps", "4",
                      "--out", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")])
        assert torch.get_num_threads() == 1                       # --threads 1 by default
    finally:
        torch.set_num_threads(threads)
    assert calls == [(2, 3, 1, 4)]
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["meta"]["load_average_end"] is None
    written["meta"]["load_average_end"] = committed["meta"]["load_average_end"]
    assert written == committed
    assert (tmp_path / "r.md").read_text() == editing.markdown(committed)
    assert capsys.readouterr().out == editing.markdown(committed) + "\n"
    with pytest.raises(SystemExit):
        editing.main([])                                          # nothing to do without --sweep
    assert "nothing to do: pass --sweep" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--threads"):
        editing.main(["--sweep", "--threads", "0"])
    assert calls == [(2, 3, 1, 4)]                                # refused before any sweep ran


def test_border_band_is_two_pixels_each_side_by_default():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1                                             # border between columns 3 and 4
    assert editing.border_band(mask)[0].all(0).tolist() == [c in (2, 3, 4, 5) for c in range(8)]


def test_a_numpy_image_with_two_channels_gets_no_alpha_hint():
    with pytest.raises(ValueError) as info:
        editing.as_image(np.zeros((8, 8, 2), np.uint8))
    assert str(info.value) == "image: a numpy image must be (H, W, 3) or (B, H, W, 3), got shape (8, 8, 2)"


def test_inpaint_reports_the_mask_notes_and_a_strength_that_runs_no_step(inpaint_pipe, scene):
    soft = torch.full((1, 1, 128, 128), 0.3)
    soft[..., 32:96, 32:96] = 0.8                                 # soft: as_mask thresholds it, and says so
    _, mask_notes = _notes(editing.as_mask, soft, (128, 128))
    assert mask_notes
    out = editing.inpaint(inpaint_pipe, scene, soft, "a red square", strength=0.01, num_inference_steps=2)
    assert all(n in out.notes for n in mask_notes)
    assert ("strength=0.01 with 2 steps runs int(2 * 0.01) = 0 denoising steps (diffusers refuses); "
            "returned the VAE round trip") in out.notes
    assert out.timesteps == []


def test_the_blending_pipeline_is_built_without_the_safety_checker_notice():
    import logging

    text_pipe = ldm.load_pipeline("tiny", verbose=False)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("diffusers").addHandler(handler)
    try:
        editing.blending_pipeline(text_pipe)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert not [r for r in records if "safety checker" in r.getMessage()]


def test_the_cli_defaults_are_the_committed_sample_sizes_and_page(tmp_path, monkeypatch):
    """Without arguments the sweep runs with the sample sizes the committed result states."""
    committed = ldm.results.load("image_editing")
    calls = []
    monkeypatch.setattr(editing, "run_sweep", lambda *a: calls.append(a) or committed)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "benchmarks").mkdir()
    threads = torch.get_num_threads()
    try:
        editing.main(["--sweep", "--out", str(tmp_path / "r.json")])
    finally:
        torch.set_num_threads(threads)
    s = committed["strength_sweep"]
    assert calls == [(s["n"] // 2, committed["inpainting"]["n"], committed["outpainting"]["n"], s["steps"])]
    assert (tmp_path / "benchmarks" / "image_editing.md").read_text() == editing.markdown(committed)
    without_note = {**committed, "meta": {k: v for k, v in committed["meta"].items() if k != "note"}}
    assert editing.markdown(without_note).splitlines()[3] == (
        "The machine was shared with other jobs: the seconds are an upper bound.")


@pytest.mark.parametrize("mode", ["LA", "P"])
def test_grey_alpha_and_palette_transparency_are_composited_over_white(mode):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0                                             # one transparent pixel
    im = PIL.Image.fromarray(rgba, "RGBA")
    im = im.convert("LA") if mode == "LA" else im.convert("RGB").convert("P")
    if mode == "P":
        im.info["transparency"] = im.getpixel((0, 0))              # black is the transparent index
    x, notes = _notes(editing.as_image, im)
    assert x[0, :, 0, 0].tolist() == [1.0, 1.0, 1.0]                # white where it was clear
    assert any("alpha was composited over white" in n for n in notes)


def test_float_image_at_minus_one_exactly_is_accepted():
    t = torch.full((1, 3, 8, 8), -1.0)
    t[..., 0, 0] = 1.0
    torch.testing.assert_close(editing.as_image(t, notes=[]), t)


def test_a_mask_size_of_zero_is_refused():
    with pytest.raises(ValueError, match=r"^size must be \(height, width\) as two positive integers"):
        editing.as_mask(torch.zeros(1, 1, 8, 8), (0, 8))


def test_inpaint_keeps_a_wide_image_wide_and_reports_its_timesteps(inpaint_pipe, scene):
    wide = torch.cat([scene, scene[..., :32]], -1)                # 128 x 160
    mask = torch.zeros(1, 1, 128, 160)
    mask[..., 40:88, 40:88] = 1
    out = editing.inpaint(inpaint_pipe, wide, mask, "a red square", strength=1.0, num_inference_steps=2)
    assert out.images.shape == (1, 3, 128, 160)
    assert out.timesteps == [int(t) for t in inpaint_pipe.scheduler.timesteps] and len(out.timesteps) == 2
    with pytest.raises(ValueError, match=r"^image: 2 images and 3 prompts"):
        editing.inpaint(inpaint_pipe, torch.cat([scene, scene]), mask[..., :128], ["a", "b", "c"])


def test_run_sweep_feeds_each_comparison_its_held_out_scenes_and_records_the_run(monkeypatch, capsys):
    """The sweep driver with its three comparisons replaced by recorders: each gets the scenes, targets,
    masks and step count it should (rebuilt here), and the result's meta has what the committed one has."""
    import datetime

    from ldm_tutorial.runtime import cpu_name

    calls = {}

    def recorder(key):
        def fn(*args, **kwargs):
            calls[key] = (args, kwargs)
            return {"which": key}
        return fn

    for key in ("strength_sweep", "inpaint_compare", "outpaint_compare"):
        monkeypatch.setattr(editing, key, recorder(key))
    result = editing.run_sweep(n_strength=1, n_inpaint=2, n_outpaint=1, steps=3, progress=False)

    def objects(scenes):
        return [(s.objects, s.bg_seed) for s in scenes]

    from diffusers import StableDiffusionImg2ImgPipeline

    assert capsys.readouterr().out == ""                           # the pipelines load quietly
    (text, scenes, targets, strengths), kw = calls["strength_sweep"]
    assert isinstance(text, StableDiffusionImg2ImgPipeline)
    assert objects(scenes) == objects(editing.sweep_scenes(1)) and len(scenes) == 2      # one and two objects
    assert objects(targets) == objects(editing.edit_targets(scenes, "recolour"))
    assert strengths == editing.SWEEP_STRENGTHS and kw == {"num_inference_steps": 3, "progress": False}
    (inp, text2, scenes2, targets2, masks), kw = calls["inpaint_compare"]
    want = editing.sweep_scenes(2, counts=(2,), seed=editing.SWEEP_SEED + 10)
    assert objects(scenes2) == objects(want) and inp.unet.config.in_channels == 9 and text2 is text
    source = shapes.render(want)
    torch.testing.assert_close(masks, torch.cat([editing.object_mask(source[i:i + 1]) for i in range(2)]))
    assert objects(targets2) == objects(editing.inpaint_targets(want, source))
    assert kw == {"num_inference_steps": 3, "progress": False}
    (inp3, scenes3), kw = calls["outpaint_compare"]
    assert inp3 is inp and kw == {"num_inference_steps": 3, "progress": False}
    assert objects(scenes3) == objects(editing.sweep_scenes(1, counts=(1,), seed=editing.SWEEP_SEED + 20))
    assert {k: result[k] for k in ("strength_sweep", "inpainting", "outpainting")} == {
        "strength_sweep": {"which": "strength_sweep"}, "inpainting": {"which": "inpaint_compare"},
        "outpainting": {"which": "outpaint_compare"}}
    meta, committed = result["meta"], ldm.results.load("image_editing")["meta"]
    assert meta["command"] == committed["command"] and set(meta["seconds"]) == set(committed["seconds"])
    s = meta["seconds"]
    assert min(s.values()) >= 0 and s["total"] >= s["strength"] + s["inpainting"] + s["outpainting"]
    assert (meta["machine"], meta["threads"]) == (cpu_name(), torch.get_num_threads())
    assert meta["date"] == datetime.date.today().isoformat() and meta["load_average_end"] >= 0


def test_size_and_channel_messages_whole():
    with pytest.raises(ValueError) as info:
        editing.as_image(torch.zeros(1, 3, 8, 12), notes=[])
    assert str(info.value) == ("image is 8x12 (height x width); both must be multiples of 8 (the VAE's "
                               "downsampling factor): crop or resize it to 8x8 or 8x16")
    with pytest.raises(ValueError) as info:
        editing.as_image(torch.zeros(1, 4, 8, 8))
    assert str(info.value) == ("image: a torch image must be (3, H, W) or (B, 3, H, W), got shape (1, 4, 8, 8) "
                               "(4 channels: diffusers would take this for latents and skip the VAE; "
                               "drop or composite the alpha channel)")


def test_img2img_is_quiet_by_default_says_its_notes_when_verbose_and_keeps_strength(img2img_pipe, scene,
                                                                                      capsys):
    out = editing.img2img(img2img_pipe, scene, "a red square", num_inference_steps=2)
    assert capsys.readouterr().out == "" and out.strength == 0.6 and out.notes
    out = editing.img2img(img2img_pipe, scene, "a red square", num_inference_steps=2, verbose=True)
    assert capsys.readouterr().out.splitlines() == [f"note: {n}" for n in out.notes]


def test_inpaint_uses_its_negative_prompt(inpaint_pipe, scene):
    mask = torch.zeros(1, 1, 128, 128)
    mask[..., 32:96, 32:96] = 1
    kw = dict(num_inference_steps=2, guidance_scale=7.5)
    plain = editing.inpaint(inpaint_pipe, scene, mask, "a red square",
                            generator=torch.Generator().manual_seed(0), **kw).images
    negative = editing.inpaint(inpaint_pipe, scene, mask, "a red square", negative_prompt="a blue circle",
                               generator=torch.Generator().manual_seed(0), **kw).images
    assert (plain - negative).abs().mean() > 1e-3


def test_object_mask_of_an_object_at_the_left_edge_starts_at_column_zero():
    scene = shapes.Scene([shapes.SceneObject("red", "square", "large", "left")])
    image = shapes.render([scene])
    x0 = parser.parse_scene(image[0])[0].box[0]
    assert x0 - 6 < 8                                             # its grown box reaches the first latent column
    assert editing.object_mask(image)[0, 0, :, 0].any()
