"""Chapter 5 helpers: the SD family table, attention layout, tiny SDXL / SD3 components, schedules."""
import pytest
import torch

import ldm_tutorial as ldm
from ldm_tutorial import schedules


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models are fastest on one thread (and two threads thrash on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def table():
    return {row.member.name: row for row in ldm.family_table()}


def test_family_table_covers_the_family(table):
    for name in ["sd15-unet", "sd21-unet", "sdxl-base-unet", "sdxl-refiner-unet", "sd3-medium-transformer",
                 "flux1-dev-transformer", "sd-vae", "sd3-vae", "flux-vae", "clip-l-text", "openclip-h-text-sd2",
                 "openclip-bigg-text", "t5-xxl-encoder"]:
        assert name in table
    # the fp16 column against the bytes a real float16 copy of the weights takes (built on meta, cast)
    for name in ("clip-l-text", "sd-vae"):
        half = ldm.build_on_meta(name).half()
        assert table[name].fp16_bytes == sum(p.numel() * p.element_size() for p in half.parameters())


def test_sdxl_base_unet_count_matches_computed_and_published(table):
    n = table["sdxl-base-unet"].params
    assert abs(n - 2_567_463_684) / 2_567_463_684 < 0.005, n       # computed from the config
    assert abs(n - 2.6e9) / 2.6e9 < 0.02                            # SDXL paper, Tab. 1: 2.6B


def test_refiner_is_not_1_3b_and_sdxl_channels_are_not_wider(table):
    assert table["sdxl-refiner-unet"].params > 2.2e9
    sd15, sdxl = ldm.CONFIGS["sd15-unet"].config, ldm.CONFIGS["sdxl-base-unet"].config
    assert sdxl["block_out_channels"] == sd15["block_out_channels"][:3]


def test_text_encoder_widths_and_sdxl_conditioning_arithmetic(table):
    clip_l, big_g = ldm.CONFIGS["clip-l-text"].config, ldm.CONFIGS["openclip-bigg-text"].config
    base, refiner = ldm.CONFIGS["sdxl-base-unet"].config, ldm.CONFIGS["sdxl-refiner-unet"].config
    assert clip_l["hidden_size"] + big_g["hidden_size"] == base["cross_attention_dim"] == 2048
    assert big_g["projection_dim"] + 6 * base["addition_time_embed_dim"] == base["projection_class_embeddings_input_dim"]
    assert big_g["projection_dim"] + 5 * refiner["addition_time_embed_dim"] == refiner["projection_class_embeddings_input_dim"]
    both = table["clip-l-text"].params + table["openclip-bigg-text"].params
    assert abs(both - 817e6) / 817e6 < 0.005                        # SDXL paper: 817M for both encoders


def test_t5_tied_embedding_counted_once(table):
    t5 = ldm.build_on_meta("t5-xxl-encoder")
    assert t5.shared.weight is t5.encoder.embed_tokens.weight
    embedding = t5.shared.weight.numel()
    listed_twice = sum(p.numel() for _, p in t5.named_parameters(remove_duplicate=False))
    assert ldm.count_parameters(t5) == listed_twice - embedding   # the tied matrix, counted once
    assert abs(table["t5-xxl-encoder"].params - 4.7e9) < embedding  # within one embedding of the published 4.7B


def test_vae_latent_formats(table):
    assert "4 ch, scale 0.18215" in table["sd-vae"].attention
    assert "4 ch, scale 0.13025" in table["sdxl-vae"].attention
    assert "16 ch, scale 1.5305, shift 0.0609" in table["sd3-vae"].attention
    assert "16 ch, scale 0.3611, shift 0.1159" in table["flux-vae"].attention


def test_attention_sites_sdxl_vs_sd15():
    sdxl = ldm.attention_sites(ldm.build_on_meta("sdxl-base-unet"), 1024)
    sd15 = ldm.attention_sites(ldm.build_on_meta("sd15-unet"), 512)
    assert [s.where for s in sdxl] == ["64x64", "32x32"]             # nothing at 128x128
    assert [(s.heads, s.blocks) for s in sdxl] == [(10, 10), (20, 60)]
    assert sdxl[0].matrix_elements == sd15[0].matrix_elements == 4096 ** 2
    assert sum(s.blocks for s in sd15) == 16


def test_attention_sites_match_recorded_calls_on_meta():
    unet = ldm.build_on_meta("sdxl-base-unet")
    meta = dict(device="meta")
    with torch.no_grad(), ldm.record_attention(unet) as calls:
        unet(torch.empty(1, 4, 128, 128, **meta), 1, encoder_hidden_states=torch.empty(1, 77, 2048, **meta),
             added_cond_kwargs={"text_embeds": torch.empty(1, 1280, **meta), "time_ids": torch.empty(1, 6, **meta)})
    self_attn = [c for c in calls if c.key_tokens == c.query_tokens]
    expected = ldm.attention_sites(unet, 1024)
    assert len(self_attn) == sum(s.blocks for s in expected)
    assert ldm.attention_matrix_bytes(expected) == sum(2 * c.heads * c.query_tokens * c.key_tokens for c in self_attn)
    assert all(type(p).__name__ != "_Recorder" for p in unet.attn_processors.values())   # restored


def test_mmdit_sites():
    sd3 = ldm.attention_sites(ldm.build_on_meta("sd3-medium-transformer"), 1024)
    flux = ldm.attention_sites(ldm.build_on_meta("flux1-dev-transformer"), 1024)
    assert [(s.tokens, s.blocks, s.heads) for s in sd3] == [(4096 + 333, 24, 24)]
    assert [(s.tokens, s.blocks) for s in flux] == [(4096 + 512, 19), (4096 + 512, 38)]


def test_tiny_sdxl_pipeline_output_shape_and_missing_added_cond():
    base, refiner = ldm.tiny_sdxl_pipelines(seed=0)
    assert base.unet.config.cross_attention_dim == (base.text_encoder.config.hidden_size
                                                     + base.text_encoder_2.config.hidden_size)
    image = base("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="pt").images
    assert image.shape == (1, 3, 128, 128) and torch.isfinite(image).all()
    sample, text = torch.zeros(1, 4, 16, 16), torch.zeros(1, 77, 48)
    with pytest.raises(TypeError, match="NoneType"):             # called like an SD 1.5 U-Net
        base.unet(sample, 1, encoder_hidden_states=text)
    with pytest.raises(ValueError, match="text_embeds"):         # time ids without the pooled embedding
        base.unet(sample, 1, encoder_hidden_states=text, added_cond_kwargs={"time_ids": torch.zeros(1, 6)})


def test_tiny_refiner_handoff_splits_the_schedule():
    base, refiner = ldm.tiny_sdxl_pipelines(seed=0)
    seen = {"base": [], "refiner": []}

    def record(key):
        def callback(pipe, i, t, kwargs):
            seen[key].append(int(t))
            return kwargs
        return callback

    latents = base("a cat", num_inference_steps=10, denoising_end=0.8, output_type="latent",
                   generator=torch.Generator().manual_seed(0), callback_on_step_end=record("base")).images
    image = refiner("a cat", image=latents, num_inference_steps=10, denoising_start=0.8, output_type="pt",
                    generator=torch.Generator().manual_seed(0), callback_on_step_end=record("refiner")).images
    assert latents.shape == (1, 4, 16, 16) and image.shape == (1, 3, 128, 128)
    assert len(seen["base"]) == 8 and len(seen["refiner"]) == 2
    assert min(seen["base"]) > max(seen["refiner"])


def test_sd3_joint_sequence_and_written_out_attention():
    model = ldm.tiny_sd3_transformer(seed=0)
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    latents = torch.randn(1, cfg.in_channels, 16, 16, generator=g)
    text = torch.randn(1, 333, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)
    kwargs = dict(encoder_hidden_states=text, pooled_projections=pooled, timestep=torch.tensor([500.0]))
    with torch.no_grad():
        with ldm.record_attention(model) as calls:
            reference = model(latents, **kwargs).sample
        patches = (16 // cfg.patch_size) ** 2
        assert [c.query_tokens for c in calls] == [patches + 333] * cfg.num_layers
        model.set_attn_processor(ldm.JointAttentionWrittenOut())
        written_out = model(latents, **kwargs).sample
    torch.testing.assert_close(written_out, reference)


def test_log_snr_monotone_and_shift_matches_scheduler():
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    ddpm = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    log_snr = schedules.ddpm_log_snr(ddpm.alphas_cumprod)
    assert (log_snr.diff() < 0).all() and log_snr[-1] > -6       # SD's schedule never reaches zero SNR
    plain, shifted = FlowMatchEulerDiscreteScheduler(shift=1.0), FlowMatchEulerDiscreteScheduler(shift=3.0)
    torch.testing.assert_close(schedules.shift_sigmas(plain.sigmas, 3.0), shifted.sigmas)
    flow = schedules.flow_log_snr(shifted.sigmas[1:])
    assert (flow.diff() > 0).all()                              # sigmas go from noise to data
    assert schedules.flow_log_snr(torch.tensor([1.0])).isinf().all()
    with pytest.raises(ValueError, match="sigmas"):
        schedules.flow_log_snr(torch.tensor([0.0]))


def test_paths_straight_vs_curved():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 64, 64, generator=g), torch.randn(4, 64, 64, generator=g)
    t = torch.linspace(0, 1, 101)
    assert schedules.path_straightness(schedules.flow_path(x0, noise, t)) == pytest.approx(1.0, abs=1e-9)
    alphas = torch.cos(t * torch.pi / 2) ** 2                   # a variance-preserving path from x0 to noise
    assert schedules.path_straightness(schedules.vp_path(x0, noise, alphas)) == pytest.approx(torch.pi / 8**0.5, abs=0.01)


def test_sdxl_pipelines_offline_falls_back_to_tiny_and_real_fails_fast(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base, refiner, source = ldm.sdxl_pipelines("auto", device="cpu", seed=0)
    line = capsys.readouterr().out
    assert source == "tiny" and "tiny" in line and "offline (HF_HUB_OFFLINE=1)" in line
    assert type(base).__name__ == "StableDiffusionXLPipeline"
    assert type(refiner).__name__ == "StableDiffusionXLImg2ImgPipeline"
    assert refiner.text_encoder_2 is base.text_encoder_2 and refiner.vae is base.vae
    with pytest.raises(RuntimeError, match=r"Hub is offline.*sdxl_pipelines\('tiny'\)"):
        ldm.sdxl_pipelines("real")
    with pytest.raises(ValueError, match="source must be"):
        ldm.sdxl_pipelines("sdxl")


def test_sd15_scheduler_is_pndm_and_ddim_from_it_inherits_leading_spacing():
    from diffusers import DDIMScheduler, PNDMScheduler

    cfg = ldm.arch.SD15_SCHEDULER
    assert cfg["_class_name"] == "PNDMScheduler"
    pndm = PNDMScheduler.from_config(cfg)
    assert pndm.config.skip_prk_steps and pndm.config.steps_offset == 1
    ddim, unused = DDIMScheduler.from_config(cfg, return_unused_kwargs=True)
    assert "skip_prk_steps" in unused                                # PNDM-only: DDIM drops it
    assert ddim.config.timestep_spacing == "leading" and not ddim.config.set_alpha_to_one
    ddim.set_timesteps(2)
    assert ddim.timesteps.tolist() == [501, 1]                       # leading: never starts at 999


def test_sdxl_negative_prompt_none_gives_zeros_but_empty_string_is_encoded():
    """Chapter 5, section 2: zeros only for negative_prompt=None with force_zeros_for_empty_prompt."""
    base, _, source = ldm.sdxl_pipelines("tiny", seed=0)
    assert source == "tiny" and base.config.force_zeros_for_empty_prompt
    kwargs = dict(device=base.device, do_classifier_free_guidance=True)
    none = base.encode_prompt("a red circle", negative_prompt=None, **kwargs)
    empty = base.encode_prompt("a red circle", negative_prompt="", **kwargs)
    assert none[1].abs().max() == 0 and none[3].abs().max() == 0
    assert empty[1].abs().max() > 0.1 and empty[3].abs().max() > 0.1
