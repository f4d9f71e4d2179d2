"""The locally connected layer against its dense masked equivalent, in float64."""

import math

import pytest
import torch

from fflab.ff.layers import Dense, write_grad
from fflab.ff.local import LocallyConnected2d

# (in_shape, out_channels, kernel, stride, padding)
SHAPES = [
    ((1, 6, 6), 3, 3, 1, 0),
    ((1, 7, 7), 2, 3, 2, 1),
    ((3, 6, 5), 4, 3, 1, 1),
    ((2, 8, 8), 3, 5, 2, 2),
    ((2, 5, 7), 2, 2, 2, 0),
    ((1, 4, 4), 2, 4, 1, 0),  # one location
    ((2, 3, 3), 2, 5, 1, 1),  # every window reaches into the padding
]


# tile shapes of the fast path: the default choice, the reference layout, and ragged ones
TILES = [None, (1, 1), (2, 2), (3, 2)]


def layer_for(shape, seed=0, tile=None):
    in_shape, c_out, k, s, p = shape
    g = torch.Generator().manual_seed(seed)
    return LocallyConnected2d(in_shape, c_out, k, s, p, generator=g, tile=tile).double()


def rand(*size, seed=1):
    return torch.randn(*size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def randomize_bias(layer, seed=2):
    with torch.no_grad():
        layer.bias.copy_(rand(*layer.bias.shape, seed=seed))


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_equals_dense_equivalent(shape, tile):
    layer = layer_for(shape, tile=tile)
    randomize_bias(layer)
    c_out, h_out, w_out = layer.out_shape
    assert layer.out_features == c_out * h_out * w_out
    assert layer.in_features == math.prod(shape[0])
    h = rand(5, layer.in_features)
    w, b = layer.dense_equivalent()
    assert w.shape == (layer.out_features, layer.in_features) and b.shape == (layer.out_features,)
    for grad in (True, False):  # the differentiable reference, and the tiled fast path
        with torch.set_grad_enabled(grad):
            z = layer(h)
        assert z.requires_grad == grad
        torch.testing.assert_close(z, h @ w.T + b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tile", [(1, 1), (2, 2)])
@pytest.mark.parametrize("per", [1, 2, 3])
def test_blocks_of_locations_change_nothing(per, tile):
    """Forward (both paths) and gradient over blocks of ``per`` locations or tiles equal one
    block."""
    shape = ((3, 6, 5), 4, 3, 1, 1)
    whole, split = layer_for(shape, tile=tile), layer_for(shape, tile=tile)
    randomize_bias(whole)
    randomize_bias(split)
    split._blocks = lambda n, count, width: [(s, min(s + per, count)) for s in range(0, count, per)]
    assert len(split._blocks(4, split.tiles, 1)) > 1
    assert len(whole._blocks(4, whole.locations, whole.fan_in)) == 1
    h, dz = rand(4, whole.in_features, seed=7), rand(4, whole.out_features, seed=8)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(split(h), whole(h), rtol=1e-12, atol=1e-12)
    g_whole, g_split = Grads(), Grads()
    whole.local_grad(h, dz, g_whole)
    split.local_grad(h, dz, g_split)
    torch.testing.assert_close(
        g_split.got[split.weight], g_whole.got[whole.weight], rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_equals_conv_per_location(shape):
    """Output (c, i, j) is the window at (i s - p, j s - p) of the zero-padded input times
    that unit's own weights: checked by explicit loops over units."""
    layer = layer_for(shape)
    randomize_bias(layer)
    (c_in, hh, ww), c_out, k, s, p = shape
    _, h_out, w_out = layer.out_shape
    assert h_out == (hh + 2 * p - k) // s + 1 and w_out == (ww + 2 * p - k) // s + 1
    x = rand(3, c_in, hh, ww)
    xp = torch.nn.functional.pad(x, (p, p, p, p))
    z = layer(x.reshape(3, -1)).view(3, c_out, h_out, w_out)
    for i in range(h_out):
        for j in range(w_out):
            loc = i * w_out + j
            window = xp[:, :, i * s : i * s + k, j * s : j * s + k].reshape(3, -1)
            want = window @ layer.weight[loc].T + layer.bias[loc]
            torch.testing.assert_close(z[:, :, i, j], want, rtol=1e-12, atol=1e-12)


def brute_mask(in_shape, c_out, k, s, p):
    c_in, hh, ww = in_shape
    h_out, w_out = (hh + 2 * p - k) // s + 1, (ww + 2 * p - k) // s + 1
    m = torch.zeros(c_out * h_out * w_out, c_in * hh * ww, dtype=torch.float64)
    for c in range(c_out):
        for i in range(h_out):
            for j in range(w_out):
                for ci in range(c_in):
                    for y in range(hh):
                        for x in range(ww):
                            if i * s - p <= y < i * s - p + k and j * s - p <= x < j * s - p + k:
                                m[(c * h_out + i) * w_out + j, (ci * hh + y) * ww + x] = 1
    return m


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2], SHAPES[4], SHAPES[6]])
def test_connectivity_mask_by_brute_force(shape):
    layer = layer_for(shape)
    mask = layer.connectivity_mask()
    torch.testing.assert_close(mask, brute_mask(*shape), rtol=0, atol=0)
    w, _ = layer.dense_equivalent()
    assert torch.all(w[mask == 0] == 0)
    # every window entry inside the image is a distinct input: the mask counts them all
    (c_in, _, _), c_out, k = shape[0], shape[1], shape[2]
    inside = (layer.index != layer.in_features).sum()
    assert mask.sum() == c_out * inside and inside <= layer.locations * c_in * k * k


class Grads:
    def __init__(self):
        self.got = {}

    def __call__(self, param, a, b=None, columns=slice(None)):
        assert columns == slice(None)
        self.got[param] = (a if b is None else a @ b).clone()


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("shape", SHAPES)
def test_local_grad_equals_autograd(shape, tile):
    layer = layer_for(shape, tile=tile)
    randomize_bias(layer)
    h, dz = rand(6, layer.in_features, seed=3), rand(6, layer.out_features, seed=4)
    (dz * layer(h)).sum().backward()
    sink = Grads()
    layer.local_grad(h, dz, sink)
    assert set(sink.got) == {layer.weight, layer.bias}
    torch.testing.assert_close(sink.got[layer.weight], layer.weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sink.got[layer.bias], layer.bias.grad, rtol=1e-12, atol=1e-12)
    # the plain sink writes the same into .grad
    layer.zero_grad(set_to_none=True)
    layer.local_grad(h, dz, write_grad)
    torch.testing.assert_close(layer.weight.grad, sink.got[layer.weight], rtol=0, atol=0)
    torch.testing.assert_close(layer.bias.grad, sink.got[layer.bias], rtol=0, atol=0)


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("shape", SHAPES)
def test_local_grad_equals_masked_dense_grad(shape, tile):
    """The dense layer's gradient dz' h, masked to the receptive fields, is the local one
    mapped to the dense layout; the local layer has no weight outside its fields at all."""
    layer = layer_for(shape, tile=tile)
    h, dz = rand(7, layer.in_features, seed=5), rand(7, layer.out_features, seed=6)
    dense = Dense(layer.in_features, layer.out_features).double()
    dense_grads, local_grads = Grads(), Grads()
    dense.local_grad(h, dz, dense_grads)
    layer.local_grad(h, dz, local_grads)
    mask = layer.connectivity_mask()
    mapped, _ = layer.dense_equivalent(local_grads.got[layer.weight])
    torch.testing.assert_close(mapped, dense_grads.got[dense.weight] * mask, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        local_grads.got[layer.bias].T.reshape(-1), dense_grads.got[dense.bias], rtol=1e-12, atol=0
    )
    assert layer.weight.numel() == layer.locations * layer.out_shape[0] * layer.fan_in


def test_tile_weights_follow_the_weights():
    """The fast path's tile weights follow in-place steps (also those that leave the version
    counter alone) and loaded state; outside each unit's window they stay zero."""
    shape = ((3, 6, 5), 4, 3, 1, 1)
    layer, other = layer_for(shape, tile=(2, 2)), layer_for(shape, seed=5, tile=(2, 2))
    h = rand(4, layer.in_features, seed=9)

    def check():
        w, b = layer.dense_equivalent()
        with torch.no_grad():
            torch.testing.assert_close(layer(h), h @ w.T + b, rtol=1e-12, atol=1e-12)

    check()
    with torch.no_grad():
        layer.weight.mul_(0.5).add_(0.1)  # as an optimizer step changes it
        layer.bias.add_(1.0)
    check()
    with torch.no_grad():  # a change the version counter does not see (an optimizer's
        version = layer.weight._version  # foreach step can leave it unchanged too)
        layer.weight.data.add_(rand(*layer.weight.shape, seed=10))
    assert layer.weight._version == version
    check()
    layer.load_state_dict(other.state_dict())
    check()
    tiled = layer.tile_weight()
    assert tiled.shape == (layer.tiles, layer.tile_rows, layer.tile_fan_in)
    assert torch.count_nonzero(tiled) == torch.count_nonzero(layer.weight)


def test_default_tiles():
    """2 x 2 tiles where their union window is at most 1.5 times a unit's (5x5 at stride 1),
    one location per tile elsewhere; the tiles of the mnist-ff-unsup-local layers."""
    assert LocallyConnected2d((12, 14, 14), 12, 5, 1, 2).tile == (2, 2)
    assert LocallyConnected2d((1, 28, 28), 12, 7, 2, 3).tile == (1, 1)
    assert LocallyConnected2d((2, 6, 6), 2, 3, 1, 1).tile == (1, 1)
    assert LocallyConnected2d((1, 4, 4), 2, 4, 1, 0).tile == (1, 1)  # one location
    assert LocallyConnected2d((2, 6, 6), 2, 3, 1, 1, tile=(9, 9)).tile == (6, 6)
    with pytest.raises(ValueError, match="tile"):
        LocallyConnected2d((2, 6, 6), 2, 3, 1, 1, tile=(0, 2))


def test_float32_matches_float64():
    shape = SHAPES[3]
    l64 = layer_for(shape)
    l32 = layer_for(shape).float()
    h, dz = rand(4, l64.in_features), rand(4, l64.out_features, seed=2)
    torch.testing.assert_close(l32(h.float()), l64(h).float(), rtol=1e-5, atol=1e-5)
    g32, g64 = Grads(), Grads()
    l32.local_grad(h.float(), dz.float(), g32)
    l64.local_grad(h, dz, g64)
    torch.testing.assert_close(
        g32.got[l32.weight], g64.got[l64.weight].float(), rtol=1e-5, atol=1e-5
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    shape = SHAPES[3]
    cpu = layer_for(shape)
    randomize_bias(cpu)
    gpu = layer_for(shape).cuda()
    gpu.load_state_dict(cpu.state_dict())
    h, dz = rand(4, cpu.in_features), rand(4, cpu.out_features, seed=2)
    torch.testing.assert_close(gpu(h.cuda()).cpu(), cpu(h))
    gg, gc = Grads(), Grads()
    gpu.local_grad(h.cuda(), dz.cuda(), gg)
    cpu.local_grad(h, dz, gc)
    torch.testing.assert_close(gg.got[gpu.weight].cpu(), gc.got[cpu.weight])
    torch.testing.assert_close(gg.got[gpu.bias].cpu(), gc.got[cpu.bias])


def test_init_statistics_and_seed():
    layer = LocallyConnected2d((4, 14, 14), 10, 5, 1, 2, torch.Generator().manual_seed(3))
    k = 4 * 5 * 5
    assert layer.weight.shape == (14 * 14, 10, k) and layer.bias.shape == (14 * 14, 10)
    w = layer.weight.detach().double()
    n, sd = w.numel(), 1 / math.sqrt(k)
    assert abs(w.mean()) < 4 * sd / math.sqrt(n)
    assert abs(w.std() - sd) < 4 * sd / math.sqrt(2 * n)
    assert torch.all(layer.bias == 0)
    again = LocallyConnected2d((4, 14, 14), 10, 5, 1, 2, torch.Generator().manual_seed(3))
    other = LocallyConnected2d((4, 14, 14), 10, 5, 1, 2, torch.Generator().manual_seed(4))
    assert torch.equal(again.weight, layer.weight)
    assert not torch.equal(other.weight, layer.weight)
    assert set(layer.state_dict()) == {"weight", "bias"}  # the index is rebuilt, not saved


@pytest.mark.parametrize(
    "args",
    [
        ((1, 4, 4), 2, 5, 1, 0),  # kernel larger than the input
        ((1, 4, 9), 2, 7, 1, 1),  # larger than the padded height
        ((1, 4, 4), 0, 3, 1, 0),
        ((1, 4, 4), 2, 0, 1, 0),
        ((1, 4, 4), 2, 3, 0, 0),
        ((1, 4, 4), 2, 3, 1, -1),
        ((0, 4, 4), 2, 3, 1, 0),
        ((1, 4), 2, 3, 1, 0),
    ],
)
def test_bad_arguments(args):
    with pytest.raises(ValueError) as e:
        LocallyConnected2d(*args)
    assert "\n" not in str(e.value)


def test_bad_inputs():
    layer = layer_for(SHAPES[0])
    for bad in (rand(3, layer.in_features + 1), rand(layer.in_features)):
        with pytest.raises(ValueError) as e:
            layer(bad)
        assert "\n" not in str(e.value)
    h = rand(3, layer.in_features)
    with pytest.raises(ValueError):
        layer.local_grad(h, rand(3, layer.out_features - 1), Grads())
    with pytest.raises(ValueError):
        layer.local_grad(h[:, 1:], rand(3, layer.out_features), Grads())
