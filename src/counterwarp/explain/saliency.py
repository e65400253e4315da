"""Classic saliency baselines (via Captum) for a one-logit image classifier, in 2D and 3D.

These maps answer "where is the classifier sensitive?", not "what change of the anatomy
moves its decision?"; counterwarp reports them beside its volume-change maps for comparison.

The classifier is any ``nn.Module`` mapping images ``(B, 1, *S)`` (``S`` = ``(H, W)`` or
``(D, H, W)``) to logits ``(B,)`` or ``(B, 1)``; the attributed output is that logit (the
"diseased" score). Every method returns one float32 map per image, ``(B, *S)``, on the
images' device, in units of logit per unit intensity (gradient, SmoothGrad, guided
backprop) or logit (gradient x input, integrated gradients, occlusion); Grad-CAM is a
non-negative relevance in arbitrary units.

The classifier is switched to eval mode for the call and restored afterwards; its parameters
are never modified and no hook is left behind (Captum removes the hooks it registers).
Drawing the maps is :func:`counterwarp.report.figures.saliency_panel`'s job.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from captum.attr import (
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    NoiseTunnel,
    Occlusion,
    Saliency,
)
from torch import Tensor, nn

from counterwarp.errors import CounterwarpError
from counterwarp.nn.classifier import last_conv_layer

SALIENCY_METHODS: tuple[str, ...] = (
    "gradient",
    "gradient_x_input",
    "integrated_gradients",
    "smoothgrad",
    "guided_backprop",
    "gradcam",
    "occlusion",
)

__all__ = ["SALIENCY_METHODS", "saliency_map"]


class _Logit(nn.Module):
    """Adapter: ``(B, 1, *S)`` images -> ``(B,)`` logits, whatever the model's logit shape.

    Captum then attributes each example's own scalar output (``target=None``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        out = self.model(images)
        if out.ndim == 2 and out.shape[1] == 1:
            out = out[:, 0]
        if out.ndim != 1 or out.shape[0] != images.shape[0]:
            raise CounterwarpError(
                f"the classifier must return one logit per image, shape (B,) or (B, 1); "
                f"it returned {tuple(out.shape)} for a batch of {images.shape[0]}"
            )
        return out


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode for the block, then restore each one's flag."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.train(training)


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor):
        raise CounterwarpError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim not in (4, 5) or images.shape[1] != 1:
        raise CounterwarpError(
            f"images must have shape (B, 1, H, W) or (B, 1, D, H, W), got {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise CounterwarpError(f"images must be floating point, got {images.dtype}")


def saliency_map(
    model: nn.Module,
    images: Tensor,
    method: str,
    *,
    target_layer: nn.Module | None = None,
    occlusion_patch: int = 4,
    ig_steps: int = 32,
    smoothgrad_samples: int = 16,
    smoothgrad_sigma: float = 0.15,
    baseline: float = 0.0,
    perturbations_per_eval: int = 8,
) -> Tensor:
    """Saliency map of the classifier's logit for each image.

    Args:
        model: classifier, ``(B, 1, *S)`` -> logits ``(B,)`` or ``(B, 1)``. Its training flag
            is restored after the call; parameters are untouched.
        images: ``(B, 1, H, W)`` or ``(B, 1, D, H, W)`` float intensities.
        method: one of :data:`SALIENCY_METHODS`:

            - ``gradient``: signed raw gradient d logit / d x (Captum ``Saliency``,
              ``abs=False``).
            - ``gradient_x_input``: gradient * x (``InputXGradient``).
            - ``integrated_gradients``: ``IntegratedGradients`` from a constant ``baseline``
              image (0 = background), ``ig_steps`` Gauss-Legendre steps; the map sums to
              ``logit(x) - logit(baseline)`` up to the quadrature error.
            - ``smoothgrad``: mean signed gradient over ``smoothgrad_samples`` noisy copies
              (``NoiseTunnel`` over ``Saliency``), noise sd = ``smoothgrad_sigma`` times the
              image's intensity range (max - min, per image). Uses torch's global RNG.
            - ``guided_backprop``: ``GuidedBackprop``; it overrides the backward pass of
              ``nn.ReLU`` *modules* only (hooks removed afterwards). ReLUs applied as
              functions (``F.relu``, ``torch.relu``) are not seen, and a model without
              ``nn.ReLU`` modules gets the plain gradient (a warning says so).
            - ``gradcam``: ``LayerGradCam`` on ``target_layer`` (default: the last
              ``nn.Conv2d``/``nn.Conv3d``; for counterwarp's classifier pass
              ``last_conv_layer(model)``), positive part (``relu_attributions=True``),
              upsampled (bilinear / trilinear) to the image size. Non-negative.
            - ``occlusion``: ``Occlusion`` with a square / cubic patch of
              ``occlusion_patch`` voxels, stride ``max(1, patch // 2)``, filled with
              ``baseline``; each voxel gets the mean logit drop of the patches covering
              it. Cost: one forward pass per patch position.
        target_layer: Grad-CAM layer (ignored by the other methods).
        occlusion_patch: occlusion patch edge in voxels (1 .. smallest spatial size).
        ig_steps: integration steps for integrated gradients.
        smoothgrad_samples: noisy samples per image for SmoothGrad.
        smoothgrad_sigma: SmoothGrad noise sd as a fraction of the image intensity range.
        baseline: constant reference intensity for integrated gradients and occlusion.
        perturbations_per_eval: occluded copies evaluated per forward pass (memory/speed).

    Returns:
        ``(B, *S)`` float32 map, same device as ``images``.

    Raises:
        CounterwarpError: unknown method, badly shaped images or logits, bad settings.
    """
    if method not in SALIENCY_METHODS:
        raise CounterwarpError(
            f"unknown saliency method {method!r}; choose one of: {', '.join(SALIENCY_METHODS)}"
        )
    _check_images(images)
    spatial = tuple(images.shape[2:])
    forward = _Logit(model)
    # a fresh leaf that requires grad (Captum warns otherwise); the caller's tensor is untouched
    inputs = images.detach().requires_grad_(True)

    with _eval_mode(model), torch.enable_grad():
        if method == "gradient":
            attr = Saliency(forward).attribute(inputs, abs=False)
        elif method == "gradient_x_input":
            attr = InputXGradient(forward).attribute(inputs)
        elif method == "integrated_gradients":
            if ig_steps < 1:
                raise CounterwarpError(f"ig_steps must be >= 1, got {ig_steps}")
            attr = IntegratedGradients(forward).attribute(
                inputs,
                baselines=float(baseline),
                n_steps=ig_steps,
                internal_batch_size=inputs.shape[0] * min(ig_steps, 8),
            )
        elif method == "smoothgrad":
            attr = _smoothgrad(forward, inputs, smoothgrad_samples, smoothgrad_sigma)
        elif method == "guided_backprop":
            if not any(isinstance(m, nn.ReLU) for m in model.modules()):
                warnings.warn(
                    "guided_backprop: the classifier has no nn.ReLU modules, so guided "
                    "backprop equals the plain gradient (functional relu is not hooked)",
                    stacklevel=2,
                )
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
                attr = GuidedBackprop(forward).attribute(inputs)
        elif method == "gradcam":
            layer = target_layer if target_layer is not None else last_conv_layer(model)
            cam = LayerGradCam(forward, layer).attribute(inputs, relu_attributions=True)
            if cam.ndim != inputs.ndim:
                raise CounterwarpError(
                    f"Grad-CAM target_layer output has shape {tuple(cam.shape)}; it must be a "
                    f"{len(spatial)}D feature map (B, C, *S') like the images"
                )
            mode = "trilinear" if len(spatial) == 3 else "bilinear"
            attr = LayerAttribution.interpolate(cam, spatial, interpolate_mode=mode)
            attr = attr.clamp_min(0.0)
        else:  # occlusion
            patch = int(occlusion_patch)
            if not 1 <= patch <= min(spatial):
                raise CounterwarpError(
                    f"occlusion_patch must be between 1 and the smallest image size "
                    f"{min(spatial)}, got {occlusion_patch}"
                )
            stride = max(1, patch // 2)
            attr = Occlusion(forward).attribute(
                inputs,
                sliding_window_shapes=(1,) + (patch,) * len(spatial),
                strides=(1,) + (stride,) * len(spatial),
                baselines=float(baseline),
                perturbations_per_eval=max(1, int(perturbations_per_eval)),
            )
    return attr.detach()[:, 0].to(torch.float32)


def _smoothgrad(forward: nn.Module, inputs: Tensor, samples: int, sigma: float) -> Tensor:
    """SmoothGrad, noise sd relative to each image's intensity range; ``(B, 1, *S)``."""
    if samples < 1 or sigma < 0:
        raise CounterwarpError(
            f"smoothgrad needs smoothgrad_samples >= 1 and smoothgrad_sigma >= 0, got "
            f"{samples} and {sigma}"
        )
    tunnel = NoiseTunnel(Saliency(forward))
    maps = []
    for image in inputs.detach().split(1):
        span = float(image.max() - image.min())
        image = image.clone().requires_grad_(True)
        maps.append(
            tunnel.attribute(
                image,
                nt_type="smoothgrad",
                nt_samples=samples,
                nt_samples_batch_size=min(samples, 8),
                stdevs=sigma * span,
                abs=False,
            )
        )
    return torch.cat(maps)
