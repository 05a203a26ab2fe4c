"""Timestep respacing: which of the original T steps a shorter sampler visits.

A respaced diffusion (GaussianDiffusion.respaced) keeps the original abar_t at the
visited steps and recomputes betas between them; its timestep_map sends each of
its indices back to the original t, which is what the model always receives.
"""

from typing import List, Union


def space_timesteps(num_timesteps: int, spec: Union[str, int]) -> List[int]:
    """The sorted original timesteps kept by ``spec``.

    spec: "ddimN" takes every k-th step from 0 with the integer stride k that gives
    exactly N steps (DDIM's uniform skipping); "N" (or an int) takes N steps spread
    evenly over [0, T - 1] including both ends; "N1,N2,..." splits [0, T) into
    len(counts) near-equal sections and spreads Ni steps over section i (IDDPM).
    """
    if isinstance(spec, int):
        spec = str(spec)
    spec = spec.strip()
    if spec.startswith("ddim"):
        count = _parse_count(spec[len("ddim"):], spec)
        if count > num_timesteps:
            raise ValueError(f"respacing {spec!r} asks for {count} steps but the schedule "
                             f"has only {num_timesteps}")
        for stride in range(1, num_timesteps + 1):
            steps = list(range(0, num_timesteps, stride))
            if len(steps) == count:
                return steps
        raise ValueError(f"respacing {spec!r}: no integer stride gives exactly {count} of "
                         f"{num_timesteps} steps; use a plain count such as {str(count)!r}")
    counts = [_parse_count(part, spec) for part in spec.split(",")]
    if sum(counts) > num_timesteps:
        raise ValueError(f"respacing {spec!r} asks for {sum(counts)} steps but the schedule "
                         f"has only {num_timesteps}")
    if len(counts) > num_timesteps:
        raise ValueError(f"respacing {spec!r} has more sections than the schedule has steps")
    base, extra = divmod(num_timesteps, len(counts))
    steps, start = [], 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"respacing {spec!r}: section {i} has {size} steps, cannot take "
                             f"{count}")
        # Fractional stride so that both ends of the section are visited.
        stride = (size - 1) / (count - 1) if count > 1 else 0.0
        steps.extend(start + round(j * stride) for j in range(count))
        start += size
    return steps


def _parse_count(text: str, spec: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise ValueError(f"bad respacing {spec!r}: expected 'ddimN', 'N' or 'N1,N2,...'") from None
    if count < 1:
        raise ValueError(f"bad respacing {spec!r}: step counts must be >= 1")
    return count
