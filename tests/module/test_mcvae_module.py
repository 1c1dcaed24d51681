from __future__ import annotations

import numpy as np
import pytest
import torch

from mcvi_ops.module import CropTransform, ImageVAE, MultiContrastiveVAE


def _batch(n=8, n_perturbations=4, size=32):
    perturbation = torch.arange(n) % n_perturbations  # code 0 = controls
    return {
        "X": torch.rand(n, 2, size, size) * 3000,
        "perturbation": perturbation.unsqueeze(-1),
    }


@pytest.mark.parametrize("prior", ["both", "salient", "background", "none"])
def test_controls_salient_is_exactly_zero_in_the_loss_path(prior):
    module = MultiContrastiveVAE(2, (32, 32), 4, prior=prior, n_salient_latent=5)
    batch = _batch()
    inference, generative, loss = module(batch)
    control = batch["perturbation"].reshape(-1) == 0
    assert torch.equal(inference["s"][control], torch.zeros_like(inference["s"][control]))
    assert (inference["s"][~control] != 0).all()
    # no KL on s for controls; the Wasserstein penalty only for controls
    assert torch.all(loss.kl_local["kl_salient"][control] == 0)
    assert torch.all(loss.kl_local["kl_salient"][~control] > 0)
    qs = inference["qs"]
    expected = ((qs.loc**2 + qs.scale**2).sum(-1) * control).sum() / control.sum()
    torch.testing.assert_close(loss.extra_metrics["wasserstein_control"], expected)
    assert generative["px_mean"].shape == batch["X"].shape


def test_loss_is_elbo_plus_penalty():
    module = MultiContrastiveVAE(2, (32, 32), 4, wasserstein_penalty=3.0)
    batch = _batch()
    inference, generative, _ = module(batch)
    out = module.loss(batch, inference, generative, kl_weight=0.5)
    control = (batch["perturbation"].reshape(-1) == 0).float()
    qs = inference["qs"]
    penalty = (qs.loc**2 + qs.scale**2).sum(-1) * control
    kl = out.kl_local["kl_background"] + out.kl_local["kl_salient"]
    expected = (out.reconstruction_loss["reconstruction_loss"] + 0.5 * kl + 3.0 * penalty).mean()
    torch.testing.assert_close(out.loss, expected)


def test_prior_means_control_background_is_fixed_at_zero():
    module = MultiContrastiveVAE(2, (32, 32), 4)
    with torch.no_grad():
        module.background_prior_mean.weight.fill_(1.0)
        module.salient_prior_mean.weight.fill_(2.0)
    mean_z, mean_s = module.prior_means(torch.tensor([0, 1, 3]))
    assert torch.equal(mean_z[0], torch.zeros(32))
    assert torch.equal(mean_z[1], torch.ones(32))
    assert torch.equal(mean_s[2], torch.full((32,), 2.0))
    none = MultiContrastiveVAE(2, (32, 32), 4, prior="none")
    assert none.background_prior_mean is None and none.salient_prior_mean is None
    assert torch.equal(none.prior_means(torch.tensor([2]))[0], torch.zeros(1, 32))


def test_batch_covariate_goes_to_decoder_only():
    module = MultiContrastiveVAE(2, (32, 32), 4, n_batch=3)
    batch = _batch()
    batch["batch"] = torch.tensor([[0], [1], [2], [0], [1], [2], [0], [1]])
    _, generative, _ = module(batch)
    assert generative["px_mean"].shape == (8, 2, 32, 32)
    assert module.background_encoder.features[0].in_channels == 2
    assert module.decoder.project[0].in_features == 64 + 3
    with pytest.raises(ValueError, match="batch_index"):
        module.generative(torch.zeros(1, 32), torch.zeros(1, 32))


def test_sample_decodes_priors():
    module = MultiContrastiveVAE(2, (32, 32), 4)
    images = module.sample(torch.tensor([0, 2]), n_samples=3)
    assert images.shape == (3, 2, 2, 32, 32)


def test_reconstruct_and_sample_decode_controls_with_zero_salient():
    module = MultiContrastiveVAE(2, (32, 32), 4, n_salient_latent=5).eval()
    with torch.no_grad():
        module.salient_prior_mean.weight.fill_(1.0)
    batch = _batch()
    qz = module.inference(**module._get_inference_input(batch))["qz"]
    control = batch["perturbation"].reshape(-1) == 0
    zero = torch.zeros(int(control.sum()), 5)
    expected = module.generative(qz.loc[control], zero)["px_mean"]
    torch.testing.assert_close(module.reconstruct(batch)[control], expected)
    # drawn from the priors: the control's salient draw is replaced by 0 before decoding
    decoded = []
    generative = module.generative

    def record(z, s, batch_index=None):
        decoded.append(s)
        return generative(z, s, batch_index)

    module.generative = record
    module.sample(torch.tensor([0, 2]), n_samples=3)
    (s,) = decoded
    assert s.shape == (3, 2, 5)
    assert torch.equal(s[:, 0], torch.zeros(3, 5))
    assert (s[:, 1] != 0).all()


def test_transform_fit_and_inverse(rng):
    transform = CropTransform(2, cofactor=5.0)
    crops = rng.gamma(2.0, 300.0, size=(50, 2, 8, 8)).astype(np.float32)
    transform.fit(crops)
    y = transform(torch.as_tensor(crops))
    assert y.min() >= -1 and y.max() <= 1
    assert abs(float(y.mean())) < 0.5
    inside = (y > -1) & (y < 1)
    torch.testing.assert_close(
        transform.inverse(y)[inside], torch.as_tensor(crops)[inside], rtol=1e-3, atol=1e-2
    )


def test_image_vae_loss():
    module = ImageVAE(2, (32, 32), n_latent=7)
    inference, generative, loss = module(_batch())
    assert inference["qz"].loc.shape == (8, 7)
    assert loss.loss.ndim == 0
    assert module.sample(2).shape == (2, 2, 32, 32)


def test_random_dihedral_gives_the_eight_orientations():
    from mcvi_ops.module._base import random_dihedral

    crop = torch.arange(16.0).reshape(1, 1, 4, 4)
    seen = {tuple(random_dihedral(crop).reshape(-1).tolist()) for _ in range(400)}
    expected = {
        tuple(torch.rot90(c, k, dims=(-2, -1)).reshape(-1).tolist())
        for c in (crop, crop.flip(-1))
        for k in range(4)
    }
    assert seen == expected
    tall = torch.arange(12.0).reshape(1, 1, 4, 3)
    assert all(random_dihedral(tall).shape == tall.shape for _ in range(50))


def test_augmentation_only_while_training():
    module = MultiContrastiveVAE(2, (32, 32), 4)
    batch = _batch()
    module.eval()
    inference = module.inference(**module._get_inference_input(batch))
    torch.testing.assert_close(inference["x_transformed"], module.transform(batch["X"]))
    module.train()
    inference = module.inference(**module._get_inference_input(batch))
    # the target is the augmented input: the same pixel values, rearranged
    augmented = inference["x_transformed"]
    assert not torch.equal(augmented, module.transform(batch["X"]))
    torch.testing.assert_close(
        augmented.flatten(1).sort(dim=1).values,
        module.transform(batch["X"]).flatten(1).sort(dim=1).values,
    )
    plain = MultiContrastiveVAE(2, (32, 32), 4, augment=False).train()
    torch.testing.assert_close(
        plain.inference(**plain._get_inference_input(batch))["x_transformed"],
        plain.transform(batch["X"]),
    )


def test_perturbation_read_out_adds_weighted_cross_entropy():
    module = MultiContrastiveVAE(2, (32, 32), 4, classification_weight=5.0, wasserstein_penalty=3.0)
    batch = _batch()
    inference, generative, _ = module(batch)
    out = module.loss(batch, inference, generative, kl_weight=0.5)
    labels = batch["perturbation"].reshape(-1)
    control = (labels == 0).float()
    qs = inference["qs"]
    penalty = (qs.loc**2 + qs.scale**2).sum(-1) * control
    kl = out.kl_local["kl_background"] + out.kl_local["kl_salient"]
    logits = module.classifier(qs.loc)
    cross_entropy = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    expected = (
        out.reconstruction_loss["reconstruction_loss"]
        + 0.5 * kl
        + 3.0 * penalty
        + 5.0 * cross_entropy
    ).mean()
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.extra_metrics["classification_loss"], cross_entropy.mean())
    assert 0.0 <= float(out.extra_metrics["classification_accuracy"]) <= 1.0


def test_read_out_of_both_latents_and_gradients_reach_the_encoders():
    module = MultiContrastiveVAE(
        2, (32, 32), 4, n_background_latent=6, classification_weight=2.0, classifier_input="both"
    )
    assert module.classifier.classifier[0].in_features == 32
    assert module.background_classifier.classifier[0].in_features == 6
    batch = _batch()
    inference, generative, _ = module(batch)
    out = module.loss(batch, inference, generative)
    assert not out.extra_metrics["classification_loss"].requires_grad
    labels = batch["perturbation"].reshape(-1)
    ce = torch.nn.functional.cross_entropy
    ce_s = ce(module.classifier(inference["qs"].loc), labels, reduction="none")
    ce_z = ce(module.background_classifier(inference["qz"].loc), labels, reduction="none")
    torch.testing.assert_close(out.extra_metrics["background_classification_loss"], ce_z.mean())
    without = MultiContrastiveVAE(2, (32, 32), 4, n_background_latent=6)
    without.load_state_dict(module.state_dict(), strict=False)
    base = without.loss(batch, inference, generative).loss
    torch.testing.assert_close(out.loss, base + 2.0 * (ce_s + ce_z).mean())
    out.loss.backward()
    assert module.salient_encoder.mean.weight.grad.abs().sum() > 0
    assert module.background_encoder.mean.weight.grad.abs().sum() > 0


def test_no_read_out_without_weight_and_bad_options():
    assert MultiContrastiveVAE(2, (32, 32), 4).classifier is None
    with pytest.raises(ValueError, match="`classifier_input` must be"):
        MultiContrastiveVAE(2, (32, 32), 4, classification_weight=1.0, classifier_input="z")
    with pytest.raises(ValueError, match="`classification_weight` must be a number >= 0"):
        MultiContrastiveVAE(2, (32, 32), 4, classification_weight=-1.0)
