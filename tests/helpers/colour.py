"""Colour-vision checks of the accessibility tests: Machado et al. 2009 simulation of
deuteranopia, protanopia and tritanopia (severity 1, on linear sRGB), CIEDE2000
distances and WCAG 2 contrast ratios. Colours are sRGB in [0, 1] (or 0-255 ints where
said) or matplotlib colour strings."""

from __future__ import annotations

import numpy as np

MACHADO = {
    "deutan": np.array(
        [
            [0.367322, 0.860646, -0.227968],
            [0.280085, 0.672501, 0.047413],
            [-0.011820, 0.042940, 0.968881],
        ]
    ),
    "protan": np.array(
        [
            [0.152286, 1.052583, -0.204868],
            [0.114503, 0.786281, 0.099216],
            [-0.003882, -0.048116, 1.051998],
        ]
    ),
    "tritan": np.array(
        [
            [1.255528, -0.076749, -0.178779],
            [-0.078411, 0.930809, 0.147602],
            [0.004733, 0.691367, 0.303900],
        ]
    ),
}
VISIONS = ("normal", *MACHADO)


def rgb01(colour) -> np.ndarray:
    """(3,) sRGB in [0, 1] of a matplotlib colour string or a 0-255 triple."""
    if isinstance(colour, str):
        from matplotlib.colors import to_rgb

        return np.asarray(to_rgb(colour), float)
    return np.asarray(colour, float) / 255


def to_linear(rgb: np.ndarray) -> np.ndarray:
    return np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)


def to_srgb(lin: np.ndarray) -> np.ndarray:
    return np.where(lin <= 0.0031308, lin * 12.92, 1.055 * lin ** (1 / 2.4) - 0.055)


def simulate(colour, vision: str | None) -> np.ndarray:
    """sRGB [0, 1] of ``colour`` as seen with ``vision`` (None / "normal": unchanged)."""
    rgb = rgb01(colour)
    if vision in (None, "normal"):
        return rgb
    return to_srgb(np.clip(MACHADO[vision] @ to_linear(rgb), 0, 1))


def delta_e(a, b, vision: str | None = None) -> float:
    """CIEDE2000 distance of two colours as seen with ``vision``."""
    from skimage.color import deltaE_ciede2000, rgb2lab

    la, lb = (rgb2lab(simulate(c, vision)[None, None]) for c in (a, b))
    return float(deltaE_ciede2000(la, lb)[0, 0])


def luminance(colour, vision: str | None = None) -> float:
    """WCAG relative luminance of ``colour`` as seen with ``vision``."""
    return float(to_linear(simulate(colour, vision)) @ [0.2126, 0.7152, 0.0722])


def contrast(a, b, vision: str | None = None) -> float:
    """WCAG 2 contrast ratio of two colours."""
    hi, lo = sorted((luminance(a, vision), luminance(b, vision)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)
