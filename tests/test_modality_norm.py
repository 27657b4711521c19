"""Modality-specific normalization: routing, isolation between modalities, folding."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from nnunetv2_csa.modality_norm import (
    ModalitySpecificNorm,
    convert_to_modality_specific_norms,
    fold_modality,
    set_default_modality,
    set_modality,
)

PlainConvUNet = pytest.importorskip(
    "dynamic_network_architectures.architectures.unet").PlainConvUNet


def small_unet(norm_op, n_stages=3):
    """nnU-Net's 2D network, shrunk: 3 stages, 4..16 features."""
    torch.manual_seed(0)
    return PlainConvUNet(
        input_channels=1, n_stages=n_stages, features_per_stage=[4 * 2 ** i for i in range(n_stages)],
        conv_op=nn.Conv2d, kernel_sizes=3, strides=[1] + [2] * (n_stages - 1),
        n_conv_per_stage=2, num_classes=3, n_conv_per_stage_decoder=2, conv_bias=True,
        norm_op=norm_op, norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=False)


def distinguish_modalities(network, seed=1):
    """Gives every modality's norm its own affine parameters and running statistics, so
    that a test cannot pass merely because all copies are still identical."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, ModalitySpecificNorm):
                for norm in module.norms:
                    norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=generator))
                    norm.bias.copy_(0.5 * torch.randn(norm.bias.shape, generator=generator))
                    if getattr(norm, "running_mean", None) is not None:
                        norm.running_mean.copy_(0.3 * torch.randn(norm.running_mean.shape, generator=generator))
                        norm.running_var.copy_(0.5 + torch.rand(norm.running_var.shape, generator=generator))
    return network


def norm_layers(network):
    return [m for m in network.modules() if isinstance(m, ModalitySpecificNorm)]


def single_layer(norm, n_modalities=2, seed=1):
    layer = ModalitySpecificNorm(norm, n_modalities)
    container = distinguish_modalities(nn.Sequential(layer), seed)
    return container[0]


# ---------------------------------------------------------------- conversion

@pytest.mark.parametrize("norm_op", [nn.InstanceNorm2d, nn.BatchNorm2d])
def test_conversion_replaces_every_norm_at_every_path_with_identical_copies(norm_op):
    original = small_unet(norm_op)
    converted = convert_to_modality_specific_norms(copy.deepcopy(original), 2)
    n_original_norms = sum(isinstance(m, norm_op) for m in original.modules())
    assert len(norm_layers(converted)) == n_original_norms
    # nnU-Net registers each norm twice (ConvDropoutNormReLU.norm and .all_modules[i]);
    # forward uses all_modules, so both paths must hold the same converted layer.
    block = converted.encoder.stages[0][0].convs[0]
    assert isinstance(block.norm, ModalitySpecificNorm)
    assert any(m is block.norm for m in block.all_modules)
    plain_norms = [name for name, m in converted.named_modules(remove_duplicate=False)
                   if isinstance(m, norm_op) and ".norms." not in name]
    assert plain_norms == []
    original_state = original.state_dict()
    for name, module in converted.named_modules():
        if isinstance(module, ModalitySpecificNorm):
            for k, norm in enumerate(module.norms):
                for key, value in norm.state_dict().items():
                    assert torch.equal(value, original_state[f"{name}.{key}"]), (name, k, key)


def test_per_modality_parameters_are_ordinary_parameters_of_the_network():
    original = small_unet(nn.BatchNorm2d)
    converted = convert_to_modality_specific_norms(copy.deepcopy(original), 3)
    norm_parameter_count = sum(p.numel() for m in original.modules()
                               if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    total = lambda net: sum(p.numel() for p in net.parameters())
    assert total(converted) == total(original) + 2 * norm_parameter_count
    optimizer = torch.optim.SGD(converted.parameters(), lr=0.1)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for layer in norm_layers(converted):
        for norm in layer.norms:
            assert id(norm.weight) in optimized and id(norm.bias) in optimized


def test_converted_state_dict_loads_strictly_into_a_fresh_conversion():
    trained = distinguish_modalities(convert_to_modality_specific_norms(small_unet(nn.BatchNorm2d), 2))
    fresh = convert_to_modality_specific_norms(small_unet(nn.BatchNorm2d), 2)
    fresh.load_state_dict(trained.state_dict(), strict=True)
    trained.eval(), fresh.eval()
    x = torch.randn(2, 1, 16, 16)
    for m in (0, 1):
        set_modality(trained, m), set_modality(fresh, m)
        assert torch.equal(trained(x), fresh(x))
    # a checkpoint of the unconverted network does not silently load into it
    with pytest.raises(RuntimeError, match="norms"):
        fresh.load_state_dict(small_unet(nn.BatchNorm2d).state_dict(), strict=True)


# ---------------------------------------------------------------- BatchNorm isolation

def test_batchnorm_forward_of_one_modality_changes_only_its_running_statistics():
    layer = ModalitySpecificNorm(nn.BatchNorm2d(2), 3).train()
    x = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]],
                      [[[5.0, 7.0]], [[2.0, 2.0]]],
                      [[[100.0, -100.0]], [[9.0, 9.0]]]])  # (3, 2, 1, 2)
    set_modality(layer, torch.tensor([1, 1]))
    layer(x[:2])
    # modality 1 saw channel 0 = {1,3,5,7}: mean 4, unbiased var 20/3; channel 1 = {0,0,2,2}:
    # mean 1, unbiased var 4/3; momentum 0.1 from (0, 1).
    assert torch.allclose(layer.norms[1].running_mean, torch.tensor([0.4, 0.1]))
    assert torch.allclose(layer.norms[1].running_var, torch.tensor([0.9 + 2 / 3, 0.9 + 0.4 / 3]))
    assert int(layer.norms[1].num_batches_tracked) == 1
    for k in (0, 2):
        assert torch.equal(layer.norms[k].running_mean, torch.zeros(2))
        assert torch.equal(layer.norms[k].running_var, torch.ones(2))
        assert int(layer.norms[k].num_batches_tracked) == 0


def test_batchnorm_statistics_of_a_mixed_batch_are_per_modality_sub_batch():
    layer = ModalitySpecificNorm(nn.BatchNorm2d(1, momentum=1.0), 2).train()
    x = torch.tensor([0.0, 10.0, 2.0, 20.0]).view(4, 1, 1, 1)
    set_modality(layer, torch.tensor([0, 1, 0, 1]))
    out = layer(x)
    # modality 0 = {0, 2} -> -1, +1 ; modality 1 = {10, 20} -> -1, +1 (eps aside)
    assert torch.allclose(out.flatten(), torch.tensor([-1.0, -1.0, 1.0, 1.0]), atol=1e-4)
    assert torch.allclose(layer.norms[0].running_mean, torch.tensor([1.0]))
    assert torch.allclose(layer.norms[1].running_mean, torch.tensor([15.0]))
    assert torch.allclose(layer.norms[0].running_var, torch.tensor([2.0]))
    assert torch.allclose(layer.norms[1].running_var, torch.tensor([50.0]))


@pytest.mark.parametrize("modality", [[1, 0, 1, 0, 0], [0, 0, 1, 1, 1], [2, 0, 2, 0, 1, 1]])
def test_mixed_batch_equals_each_modality_group_run_separately_through_the_network(modality):
    network = distinguish_modalities(convert_to_modality_specific_norms(small_unet(nn.BatchNorm2d), 3)).train()
    reference = copy.deepcopy(network)
    modality = torch.tensor(modality)
    x = torch.randn(len(modality), 1, 16, 16)
    set_modality(network, modality)
    mixed = network(x)
    for k in modality.unique().tolist():
        group = (modality == k).nonzero().flatten()
        set_modality(reference, k)
        assert torch.allclose(mixed[group], reference(x[group]), atol=1e-5), k
    for layer, reference_layer in zip(norm_layers(network), norm_layers(reference)):
        for norm, reference_norm in zip(layer.norms, reference_layer.norms):
            assert torch.allclose(norm.running_mean, reference_norm.running_mean, atol=1e-6)
            assert torch.allclose(norm.running_var, reference_norm.running_var, atol=1e-6)


@pytest.mark.parametrize("norm_op", [nn.InstanceNorm2d, nn.BatchNorm2d])
def test_gradients_of_a_modality_0_loss_reach_only_modality_0_norms_and_the_shared_convs(norm_op):
    network = distinguish_modalities(convert_to_modality_specific_norms(small_unet(norm_op), 3)).train()
    modality = torch.tensor([1, 0, 0, 1])  # unsorted on purpose; modality 2 absent
    set_modality(network, modality)
    output = network(torch.randn(4, 1, 16, 16))
    output[modality == 0].square().mean().backward()
    layers = norm_layers(network)
    assert all(layer.norms[0].weight.grad.abs().sum() > 0 for layer in layers)
    assert all(layer.norms[0].bias.grad.abs().sum() > 0 for layer in layers)
    for layer in layers:
        for k in (1, 2):
            for p in (layer.norms[k].weight, layer.norms[k].bias):
                assert p.grad is None or not p.grad.any()
            absent = (layer.norms[2].weight.grad, layer.norms[2].bias.grad)
            if layer.per_sample_statistics:
                # all modalities' parameters are gathered (one compiled graph for every composition): zero
                assert all(g is not None and not g.any() for g in absent)
            else:
                # a batch-statistics norm of a modality absent from the batch is not called (the optimizer skips it)
                assert absent == (None, None)
    # (deep supervision is off, so only the last segmentation head is used)
    convs = [m for m in network.modules() if isinstance(m, nn.Conv2d)
             and not any(m is head for head in network.decoder.seg_layers[:-1])]
    assert len(convs) == 11 and all(conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0 for conv in convs)


# ---------------------------------------------------------------- per-sample norms

def apply_each_modality_module(layer, x, modality):
    """The definition: sample group k through the k-th module."""
    out = torch.empty_like(x)
    for k in modality.unique().tolist():
        group = (modality == k).nonzero().flatten()
        out[group] = layer.norms[k](x[group])
    return out


@pytest.mark.parametrize("modality", [[0, 1, 1, 0, 2], [0, 0, 1, 1], [1, 0], [2, 2, 0]])
def test_instance_norm_fast_path_equals_per_modality_modules_exactly(modality):
    layer = single_layer(nn.InstanceNorm2d(5, affine=True), 3)
    assert layer.per_sample_statistics
    modality = torch.tensor(modality)
    x = torch.randn(len(modality), 5, 9, 7) * 3 + 1
    set_modality(layer, modality)
    assert torch.equal(layer(x), apply_each_modality_module(layer, x, modality))


@pytest.mark.parametrize("norm", [nn.GroupNorm(2, 6), nn.InstanceNorm3d(6, affine=True, track_running_stats=True)])
def test_other_supported_norms_route_like_per_modality_modules(norm):
    layer = single_layer(norm, 2).train()
    reference = copy.deepcopy(layer)
    modality = torch.tensor([1, 0, 1, 1, 0])
    x = torch.randn(5, 6, 4, 5, 3) if norm.__class__.__name__.endswith("3d") else torch.randn(5, 6, 4, 5)
    set_modality(layer, modality)
    assert torch.allclose(layer(x), apply_each_modality_module(reference, x, modality), atol=1e-5)
    for norm, reference_norm in zip(layer.norms, reference.norms):
        if getattr(norm, "running_mean", None) is not None:
            assert torch.allclose(norm.running_mean, reference_norm.running_mean, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_permuting_the_batch_permutes_the_output(data):
    batch = data.draw(st.integers(1, 6), label="batch")
    modality = torch.tensor(data.draw(st.lists(st.integers(0, 2), min_size=batch, max_size=batch)))
    order = torch.tensor(data.draw(st.permutations(range(batch))))
    network = PERMUTATION_NETWORK
    x = torch.randn(batch, 2, 6, 5, generator=torch.Generator().manual_seed(batch))
    set_modality(network, modality)
    out = network(x)
    set_modality(network, modality[order])
    assert torch.allclose(network(x[order]), out[order], atol=1e-6)


PERMUTATION_NETWORK = distinguish_modalities(convert_to_modality_specific_norms(
    nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True), nn.ReLU(),
                  nn.Conv2d(4, 3, 3, padding=1), nn.InstanceNorm2d(3, affine=True)), 3))


# ---------------------------------------------------------------- folding

@pytest.mark.parametrize("norm_op", [nn.InstanceNorm2d, nn.BatchNorm2d])
def test_fold_gives_a_plain_network_with_the_original_keys_and_the_same_outputs(norm_op):
    original = small_unet(norm_op)
    network = distinguish_modalities(convert_to_modality_specific_norms(copy.deepcopy(original), 2)).eval()
    x = torch.randn(3, 1, 16, 16)
    outputs = []
    for m in (0, 1):
        folded = fold_modality(network, m).eval()
        assert type(folded) is PlainConvUNet
        assert not norm_layers(folded)
        assert list(folded.state_dict()) == list(original.state_dict())
        assert folded.encoder.stages[0][0].convs[0].norm is folded.encoder.stages[0][0].convs[0].all_modules[1]
        set_modality(network, m)
        expected = network(x)
        assert torch.allclose(folded(x), expected, atol=1e-5)
        outputs.append(expected)
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-3)  # the modalities really differ
    assert norm_layers(network)  # the converted network itself is untouched


def test_fold_sees_through_compile_and_dataparallel_wrappers():
    network = convert_to_modality_specific_norms(small_unet(nn.InstanceNorm2d), 2)
    for wrapped in (torch.compile(network), nn.DataParallel(network)):
        assert type(fold_modality(wrapped, 1)) is PlainConvUNet
        set_modality(wrapped, 1)
        assert all(layer.modality == 1 for layer in norm_layers(network))


# ---------------------------------------------------------------- routing state

def test_an_int_modality_persists_for_any_batch_size_until_changed():
    layer = single_layer(nn.InstanceNorm2d(3, affine=True), 2)
    set_default_modality(layer, 1)
    for batch in (1, 4):
        x = torch.randn(batch, 3, 5, 5)
        assert torch.equal(layer(x), layer.norms[1](x))
    set_modality(layer, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="batch of 4"):
        layer(torch.randn(4, 3, 5, 5))
    with pytest.raises(RuntimeError, match="set_modality"):
        single_layer(nn.InstanceNorm2d(3, affine=True), 2)(torch.randn(2, 3, 5, 5))  # never routed


def test_compiled_network_does_not_recompile_for_new_batches_of_the_same_layout():
    import torch._dynamo
    torch._dynamo.reset()
    network = convert_to_modality_specific_norms(
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Conv2d(4, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True)), 2)
    compiled = torch.compile(network, backend="eager")
    eager = copy.deepcopy(network)
    set_modality(compiled, torch.tensor([0, 0, 1, 1]))
    compiled(torch.randn(4, 1, 8, 8)).sum().backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            modality, x = torch.tensor([0, 0, 1, 1]), torch.randn(4, 1, 8, 8)
            set_modality(compiled, modality), set_modality(eager, modality)
            assert torch.allclose(compiled(x), eager(x), atol=1e-5)
    torch._dynamo.reset()


def test_compiled_inference_network_alternating_modalities_case_by_case_does_not_recompile():
    """The final validation routes each case to its modality: after one graph per modality,
    alternating modalities from case to case must reuse them."""
    import torch._dynamo
    torch._dynamo.reset()
    network = convert_to_modality_specific_norms(
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True), nn.ReLU()), 2).eval()
    compiled = torch.compile(network, backend="eager")
    with torch.no_grad():
        for modality in (0, 1):
            set_modality(compiled, modality)
            compiled(torch.randn(1, 1, 8, 8))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for modality in (0, 1, 1, 0, 1, 0):
                x = torch.randn(1, 1, 8, 8)
                set_modality(compiled, modality), set_modality(network, modality)
                assert torch.allclose(compiled(x), network(x), atol=1e-5)
    torch._dynamo.reset()


def test_batchnorm_sub_batch_with_one_value_per_channel_names_the_modality():
    layer = ModalitySpecificNorm(nn.BatchNorm2d(2), 3).train()
    set_modality(layer, torch.tensor([1, 1, 2]))
    assert layer(torch.randn(3, 2, 1, 2)).shape == (3, 2, 1, 2)  # 2 values per channel: fine
    with pytest.raises(ValueError, match="modality 2 has a sub-batch"):
        layer(torch.randn(3, 2, 1, 1))  # modality 2: one sample of 1 x 1


def test_forward_before_set_modality_raises():
    network = convert_to_modality_specific_norms(small_unet(nn.InstanceNorm2d), 2)
    with pytest.raises(RuntimeError, match="set_modality"):
        network(torch.randn(1, 1, 16, 16))


@pytest.mark.parametrize("bad", [2, -1, torch.tensor([0, 2]), torch.tensor([0.0, 1.0]),
                                 torch.tensor([True, False]), torch.zeros(2, 2, dtype=torch.long),
                                 torch.tensor([], dtype=torch.long), 1.0])
def test_set_modality_rejects_bad_modalities(bad):
    network = convert_to_modality_specific_norms(small_unet(nn.InstanceNorm2d), 2)
    with pytest.raises(ValueError, match="modalit"):
        set_modality(network, bad)


def test_unsplittable_norm_is_refused_by_path_and_nothing_changes():
    network = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2),
                            nn.Sequential(nn.Flatten(), nn.LayerNorm(8)))
    with pytest.raises(TypeError, match=r"'2\.1' \(LayerNorm\)"):
        convert_to_modality_specific_norms(network, 2)
    assert type(network[1]) is nn.BatchNorm2d


def test_misuse_is_reported():
    network = convert_to_modality_specific_norms(small_unet(nn.InstanceNorm2d), 2)
    with pytest.raises(ValueError, match="already"):
        convert_to_modality_specific_norms(network, 2)
    with pytest.raises(ValueError, match="convert_to_modality_specific_norms"):
        set_modality(small_unet(nn.InstanceNorm2d), 0)
    with pytest.raises(ValueError, match="modality must be an int"):
        fold_modality(network, 2)
    with pytest.raises(ValueError, match="n_modalities"):
        convert_to_modality_specific_norms(small_unet(nn.InstanceNorm2d), 0)
