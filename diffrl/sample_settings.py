"""Sampling settings that no model could use, refused in one place: by the config when it loads (before any model
does) and by SDSampler for callers that build one directly. Also the named schedule presets (`sample.schedule`)."""

from __future__ import annotations

from diffrl.errors import UserInputError, unknown_name

# Named scheduler settings a recipe can opt into with `sample.schedule`; "model" keeps the pipeline's own config.
SCHEDULE_PRESETS: dict[str, dict] = {
    "model": {},
    # Adjoint Matching's fine-tuning schedule (microsoft/soc-fine-tuning-sd): smaller betas, trailing spacing, and a
    # final ᾱ halfway between 1 and ᾱ of the last sampled timestep, which keeps the last step's σ away from 0 (the
    # control is divided by σ). DDIM only.
    "adjoint_matching": {"beta_start": 0.002, "beta_end": 0.009, "beta_schedule": "scaled_linear",
                         "timestep_spacing": "trailing", "clip_sample": False, "set_alpha_to_one": False},
    # Few-step students (SD-Turbo, SDXL-Turbo) are distilled on trailing timesteps: 1 step starts at t = 999.
    "trailing": {"timestep_spacing": "trailing"},
}
MIDPOINT_FINAL_ALPHA = {"adjoint_matching"}


def check_settings(num_steps: int, eta: float, schedule: str, scheduler: str | None, timesteps: list[int] | None,
                   noise_level: float) -> None:
    """Refuse settings no model could use, naming the config key (sample.*) in one sentence. scheduler None: the
    model family's default (known once the model is loaded)."""
    if noise_level < 0:
        raise UserInputError(f"sample.noise_level must be >= 0, got {noise_level!r}")
    if num_steps < 1:
        raise UserInputError(f"sample.num_steps must be >= 1, got {num_steps!r}")
    if not 0.0 <= eta <= 1.0:
        raise UserInputError(f"sample.eta must be in [0.0, 1.0], got {eta!r}")
    if schedule not in SCHEDULE_PRESETS:
        raise unknown_name("sample.schedule", schedule, SCHEDULE_PRESETS)
    if schedule in MIDPOINT_FINAL_ALPHA and scheduler not in (None, "ddim"):
        raise UserInputError(f"sample.schedule={schedule} is a DDIM schedule; use it with sample.scheduler=ddim")
    if timesteps is not None and scheduler != "lcm":   # None would be ddim or flow_euler
        raise UserInputError(f"explicit sample.timesteps need sample.scheduler=lcm (as DMD2 samples); "
                             f"{scheduler} takes only sample.num_steps")
