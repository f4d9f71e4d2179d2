"""Locally connected FF layer: local receptive fields without weight sharing.

Each output unit ``(c, i, j)`` sees only the ``C_in x k x k`` window of the input map at
``(i * stride - padding, j * stride - padding)`` (zero outside the image) and has its own
weights: a convolution whose filters differ at every location. This is the layer of the FF
paper's unsupervised MNIST result (local receptive fields + peer normalization).

Layout of the parameters and features:

- features are flattened maps, ``(C, H, W)`` in, ``(C_out, H_out, W_out)`` out, as in
  ``x.view(N, -1)`` of an NCHW tensor;
- ``weight`` is ``(L, C_out, K)``: ``L = H_out * W_out`` locations (row-major), ``K = C_in * k
  * k`` window entries ordered ``(c_in, dy, dx)`` (``F.unfold``'s order); ``bias`` is
  ``(L, C_out)``.

Two computations of the same products:

- the *reference* (``forward`` under autograd, and :meth:`LocallyConnected2d.patches`): the
  input is gathered, with precomputed indices, into its transposed patches ``P`` (L, K, N),
  row ``(l, kk)`` being the input feature that window entry ``kk`` of location ``l`` reads
  (padding reads an appended zero feature); then ``z' = W P`` per location, a batched matrix
  product over locations;
- the *tiled* fast path (``forward`` without a graph, and ``local_grad``): neighbouring
  locations are grouped into tiles of ``th x tw`` that read the union of their windows, ``U =
  C_in ((th - 1) s + k) ((tw - 1) s + k)`` inputs, and each tile is one dense product with the
  tile's weights laid into a ``(th tw C_out, U)`` matrix that is zero outside each unit's own
  window. This costs ``U / (th tw K)`` times the FLOPs (1.44 for 2 x 2 tiles of 5 x 5 fields)
  but gathers ``th tw K / U`` times fewer patch values (0.36 of them) and gives the GEMM a 4x
  larger side than ``C_out``; on the 2-core CPU this made the 5 x 5 layers of
  ``mnist-ff-unsup-local`` faster (``benchmarks/bench_ff.py``). ``tile=(1, 1)`` is the
  reference's own layout. Both run over blocks of tiles whose patches fill a few MiB, each
  gathered right before its ``bmm`` (see :meth:`LocallyConnected2d._blocks`: 4-6 times faster
  than one gather of all patches on a 2-core CPU). The tests hold the two paths equal, for
  every tile shape, and to the dense layer with the layer's connectivity mask.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fflab.ff.layers import GradSink


class LocallyConnected2d(nn.Module):
    """Locally connected layer on flattened maps (an FF layer, see :mod:`fflab.ff.layers`).

    Parameters
    ----------
    in_shape : tuple of int
        Input map ``(C_in, H, W)``; the layer's input rows are its flattening.
    out_channels : int
        Units per output location, ``C_out``.
    kernel_size : int
        Side ``k`` of the square receptive field.
    stride, padding : int
        Window step, and zero padding on every side of the input map.
    generator : torch.Generator, optional
        Draws the initial weights, N(0, 1/K) (``K = C_in * k * k``, each unit's fan-in); biases
        start at 0.
    tile : (int, int), optional
        Locations per tile of the fast path, ``(th, tw)``. Default: 2 x 2 where the union of
        a tile's windows is at most 1.5 times their own size (``k >= 5`` at stride 1), else
        1 x 1. It changes the speed, never the result.

    Attributes
    ----------
    in_shape, out_shape : tuple of int
        ``(C_in, H, W)`` and ``(C_out, H_out, W_out)``, ``H_out = (H + 2 padding - k) //
        stride + 1`` (likewise ``W_out``).
    in_features, out_features : int
        ``C_in * H * W`` and ``C_out * H_out * W_out``.
    weight : Parameter (L, C_out, K)
    bias : Parameter (L, C_out)
    index : buffer (L * K,) int64
        Input feature read by each window entry (``in_features`` for the zero padding);
        not saved in the state dict.
    tile_index : buffer (T * U,) int64
        The same for the union window of each of the ``T`` tiles (not saved).
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        generator: torch.Generator | None = None,
        tile: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        in_shape = tuple(int(v) for v in in_shape)
        if len(in_shape) != 3 or min(in_shape) < 1:
            raise ValueError(f"in_shape must be 3 positive sizes (C, H, W), got {in_shape}")
        if out_channels < 1 or kernel_size < 1 or stride < 1 or padding < 0:
            raise ValueError(
                "out_channels, kernel_size and stride must be positive and padding >= 0, got "
                f"{out_channels}, {kernel_size}, {stride}, {padding}"
            )
        c, h, w = in_shape
        if kernel_size > min(h, w) + 2 * padding:
            raise ValueError(
                f"kernel {kernel_size} larger than the padded input {h + 2 * padding}x"
                f"{w + 2 * padding}"
            )
        h_out = (h + 2 * padding - kernel_size) // stride + 1
        w_out = (w + 2 * padding - kernel_size) // stride + 1
        self.in_shape = in_shape
        self.out_shape = (out_channels, h_out, w_out)
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.in_features = c * h * w
        self.out_features = out_channels * h_out * w_out
        self.locations = h_out * w_out
        self.fan_in = c * kernel_size * kernel_size
        index = self._windows(1, 1)
        self.register_buffer("index", index.reshape(-1), persistent=False)
        self.tile = self._choose_tile(tile)
        th, tw = self.tile
        self._tile_grid = (-(-h_out // th), -(-w_out // tw))
        self._union = ((th - 1) * stride + kernel_size, (tw - 1) * stride + kernel_size)
        self.tiles = self._tile_grid[0] * self._tile_grid[1]
        self.tile_rows = th * tw * out_channels
        self.tile_fan_in = c * self._union[0] * self._union[1]
        union = self._windows(th, tw)
        self.register_buffer("tile_index", union.reshape(-1), persistent=False)
        # a zero feature for windows that reach outside the map (padding, or ragged tiles)
        self.padded = bool((index == self.in_features).any() or (union == self.in_features).any())
        self._tile_weight: Tensor | None = None  # (T, R, U): zeros laid once, weights each call
        self.weight = nn.Parameter(torch.empty(self.locations, out_channels, self.fan_in))
        self.bias = nn.Parameter(torch.zeros(self.locations, out_channels))
        with torch.no_grad():
            nn.init.normal_(self.weight, 0.0, 1.0 / math.sqrt(self.fan_in), generator)

    def _choose_tile(self, tile: tuple[int, int] | None) -> tuple[int, int]:
        _, h_out, w_out = self.out_shape
        if tile is None:
            k, s = self.kernel_size, self.stride
            wide = (s + k) ** 2 <= 1.5 * k * k and min(h_out, w_out) >= 2
            return (2, 2) if wide else (1, 1)
        tile = tuple(int(v) for v in tile)
        if len(tile) != 2 or min(tile) < 1:
            raise ValueError(f"tile must be two positive sizes (th, tw), got {tile}")
        return (min(tile[0], h_out), min(tile[1], w_out))

    def _windows(self, th: int, tw: int) -> Tensor:
        """(T, U) input feature of each entry ``(c_in, y, x)`` of the union window of each
        ``th x tw`` tile of locations (row-major tiles; ``in_features`` where the window is
        outside the map). Tiles of 1 x 1 are the locations' own windows: (L, K)."""
        c, h, w = self.in_shape
        _, h_out, w_out = self.out_shape
        s, p = self.stride, self.padding
        nth, ntw = -(-h_out // th), -(-w_out // tw)
        uh, uw = (th - 1) * s + self.kernel_size, (tw - 1) * s + self.kernel_size
        rows = (torch.arange(nth) * th * s - p).view(-1, 1, 1, 1, 1) + torch.arange(uh).view(
            1, 1, 1, uh, 1
        )
        cols = (torch.arange(ntw) * tw * s - p).view(1, -1, 1, 1, 1) + torch.arange(uw).view(
            1, 1, 1, 1, uw
        )
        chan = torch.arange(c).view(1, 1, c, 1, 1)
        inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        flat = (chan * h + rows.clamp(0, h - 1)) * w + cols.clamp(0, w - 1)
        flat = torch.where(inside, flat, torch.full_like(flat, self.in_features))
        return flat.reshape(nth * ntw, c * uh * uw)

    def _weight_windows(self, tiled: Tensor):
        """Pairs ``(tile block, weight block)`` (na, nb, C_out, C_in, k, k) of the tile weights
        ``tiled`` (T, R, U) and of a tensor in the weights' (L, C_out, K) layout."""
        (th, tw), (nth, ntw), (uh, uw) = self.tile, self._tile_grid, self._union
        c_out, h_out, w_out = self.out_shape
        k, s = self.kernel_size, self.stride
        t8 = tiled.unflatten(2, (self.in_shape[0], uh, uw)).unflatten(1, (th, tw, c_out))
        t8 = t8.unflatten(0, (nth, ntw))
        for a in range(th):
            for b in range(tw):
                na, nb = len(range(a, h_out, th)), len(range(b, w_out, tw))
                window = t8[:na, :nb, a, b, :, :, a * s : a * s + k, b * s : b * s + k]
                yield window, (a, b)

    def tile_weight(self) -> Tensor:
        """The tiles' weight matrices (T, th tw C_out, U), zero outside each unit's window.

        Written afresh from the weight on every call, into a buffer whose zeros are laid once
        (per dtype and device): an optimizer's in-place step (``torch._foreach_add_`` under
        ``no_grad``) does not advance the weight's version counter, so no cache of the
        values themselves could tell that they are stale. For 1 x 1 tiles, a view of the
        weight itself.
        """
        weight = self.weight.detach()
        if self.tile == (1, 1):
            return weight
        tiled = self._tile_weight
        if tiled is None or tiled.dtype != weight.dtype or tiled.device != weight.device:
            tiled = weight.new_zeros(self.tiles, self.tile_rows, self.tile_fan_in)
            self._tile_weight = tiled
        w6 = self._as_grid(weight)
        th, tw = self.tile
        for window, (a, b) in self._weight_windows(tiled):
            window.copy_(w6[a::th, b::tw])
        return tiled

    def _as_grid(self, t: Tensor) -> Tensor:
        """A tensor in the weights' layout (L, C_out, K) as (H_out, W_out, C_out, C_in, k, k)."""
        c_out, h_out, w_out = self.out_shape
        k = self.kernel_size
        return t.view(h_out, w_out, c_out, self.in_shape[0], k, k)

    def extra_repr(self) -> str:
        return (
            f"in_shape={self.in_shape}, out_shape={self.out_shape}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
        )

    def _check(self, h: Tensor) -> None:
        if h.dim() != 2 or h.shape[1] != self.in_features:
            raise ValueError(
                f"expected input (N, {self.in_features}) (flattened {self.in_shape}), "
                f"got {tuple(h.shape)}"
            )

    def _columns(self, h: Tensor) -> Tensor:
        """The input as columns ``h'`` (in_features [+ 1 zero row for padding], N), contiguous."""
        self._check(h)
        ht = h.T
        if self.padded:  # a zero feature for the padding to read
            return torch.cat([ht, ht.new_zeros(1, ht.shape[1])])
        return ht.contiguous()

    def _blocks(self, n: int, count: int, width: int) -> list[tuple[int, int]]:
        """Runs ``[start, stop)`` of ``count`` windows of ``width`` inputs whose patches for
        ``n`` rows fill ~4 MiB.

        The patches of all locations would be ``L * K * N`` values (47 MB for a 5x5 layer of
        12 channels on 14x14 at 200 rows): memory glibc hands out fresh from the OS on every
        call (its mmap threshold cannot exceed 32 MiB), paying a page fault per 4 KiB, and
        that no cache holds. A block is gathered and multiplied while it is in cache.
        """
        per = max(1, (1 << 20) // max(1, width * n))
        return [(s, min(s + per, count)) for s in range(0, count, per)]

    @staticmethod
    def _gather(ht: Tensor, index: Tensor, start: int, stop: int, width: int) -> Tensor:
        """Transposed patches (stop - start, width, N) of windows ``start:stop`` of ``index``."""
        return ht.index_select(0, index[start * width : stop * width]).view(stop - start, width, -1)

    def patches(self, h: Tensor) -> Tensor:
        """Transposed patches ``P`` (L, K, N) of the input rows ``h`` (N, in_features)."""
        ht = self._columns(h)
        return ht.index_select(0, self.index).view(self.locations, self.fan_in, -1)

    def _tile_pairs(self, tiled: Tensor, maps: Tensor):
        """Matching views of tile position ``(a, b)`` in ``tiled`` (T, N, th tw C_out) and in
        the maps ``maps`` (N, C_out, H_out, W_out): ``(na, nb, N, C_out)`` each, one pair per
        ``(a, b)``, ``na``/``nb`` the tiles that have that position inside the map."""
        (th, tw), (nth, ntw) = self.tile, self._tile_grid
        c_out, h_out, w_out = self.out_shape
        t6 = tiled.view(nth, ntw, -1, th, tw, c_out)
        grid = maps.permute(2, 3, 0, 1)  # (H_out, W_out, N, C_out)
        for a in range(th):
            for b in range(tw):
                na, nb = len(range(a, h_out, th)), len(range(b, w_out, tw))
                yield t6[:na, :nb, :, a, b], grid[a::th, b::tw]

    def forward(self, h: Tensor) -> Tensor:
        """Total input ``z`` (N, out_features) of input rows ``h`` (N, in_features).

        Under autograd (a graph to record): the reference, ``z' = W P + b`` per location, one
        ``bmm`` per block of locations. Without one: the tiled path, ``P' W'`` per tile (the
        orientation that ran fastest on the CPU VM: 180-190 against 140 GFLOP/s for ``W P``),
        each block of tiles written into one preallocated (T, N, th tw C_out) output, then
        moved to the feature layout with the bias added in place (``baddbmm`` with a broadcast
        bias, or a ``cat`` of the blocks, was 2-4 times slower for a 5x5 layer).
        """
        ht = self._columns(h)
        n = h.shape[0]
        if torch.is_grad_enabled() and any(t.requires_grad for t in (h, self.weight, self.bias)):
            zt = torch.cat(
                [
                    torch.bmm(self.weight[s:e], self._gather(ht, self.index, s, e, self.fan_in))
                    for s, e in self._blocks(n, self.locations, self.fan_in)
                ]
            )
            zt = zt + self.bias.unsqueeze(2)
            return zt.permute(2, 1, 0).reshape(n, self.out_features)
        wt, u = self.tile_weight().transpose(1, 2), self.tile_fan_in  # (T, U, R)
        zt = ht.new_empty(self.tiles, n, self.tile_rows)
        for s, e in self._blocks(n, self.tiles, u):
            patches = self._gather(ht, self.tile_index, s, e, u)  # (e - s, U, N)
            torch.bmm(patches.transpose(1, 2), wt[s:e], out=zt[s:e])
        z = ht.new_empty(n, self.out_features)
        for tiled, flat in self._tile_pairs(zt, z.view(n, *self.out_shape)):
            flat.copy_(tiled)
        return z.add_(self.bias.detach().T.reshape(1, -1))

    def local_grad(self, h: Tensor, dz: Tensor, sink: GradSink) -> None:
        """Hand ``sink`` the gradients of ``sum(dz * forward(h))`` w.r.t. weight and bias.

        ``h`` (N, in_features), ``dz`` (N, out_features). ``dW' = P dz`` per tile (U, th tw
        C_out), one ``bmm`` per block of tiles (this orientation ran at the machine's matmul
        rate, ``dz' P'`` at 65% of it), then each unit's own window taken out of its tile;
        ``db`` is the column sum of ``dz``. Both go to ``sink(param, grad)`` in the
        parameter's shape.
        """
        n = h.shape[0]
        if dz.shape != (n, self.out_features):
            raise ValueError(f"expected dz ({n}, {self.out_features}), got {tuple(dz.shape)}")
        ht = self._columns(h)
        c_out, u = self.out_shape[0], self.tile_fan_in
        ragged = self.tiles * self.tile_rows != self.out_features
        dzt = (dz.new_zeros if ragged else dz.new_empty)(self.tiles, n, self.tile_rows)
        for tiled, flat in self._tile_pairs(dzt, dz.view(n, *self.out_shape)):
            tiled.copy_(flat)
        dwt = dz.new_empty(self.tiles, u, self.tile_rows)  # (T, U, R)
        for s, e in self._blocks(n, self.tiles, u):
            torch.bmm(self._gather(ht, self.tile_index, s, e, u), dzt[s:e], out=dwt[s:e])
        dw = torch.empty_like(self.weight)  # (L, C_out, K)
        (th, tw), w6 = self.tile, self._as_grid(dw)
        for window, (a, b) in self._weight_windows(dwt.transpose(1, 2)):
            w6[a::th, b::tw].copy_(window)
        sink(self.weight, dw)
        sink(self.bias, dz.sum(0).view(c_out, self.locations).T)

    @torch.no_grad()
    def connectivity_mask(self) -> Tensor:
        """(out_features, in_features) 0/1: 1 where a unit's receptive field holds the input."""
        w, _ = self.dense_equivalent(torch.ones_like(self.weight))
        return (w != 0).to(self.weight.dtype)

    @torch.no_grad()
    def dense_equivalent(self, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Dense ``(W, b)``, W (out_features, in_features), b (out_features,), zero outside the
        receptive fields, with ``forward(h) == h @ W.T + b``.

        ``weight`` (L, C_out, K) replaces the layer's own weights (e.g. a gradient in the
        weights' layout, to map it to the dense layout).
        """
        weight = self.weight if weight is None else weight
        c_out, n_loc, k = self.out_shape[0], self.locations, self.fan_in
        # unit (c, l) is dense row c * L + l; padding columns go to a dropped extra column
        w = weight.new_zeros(self.out_features, self.in_features + 1)
        rows = torch.arange(c_out).view(1, c_out, 1) * n_loc + torch.arange(n_loc).view(-1, 1, 1)
        rows = rows.expand(n_loc, c_out, k).to(weight.device)
        cols = self.index.view(n_loc, 1, k).expand(n_loc, c_out, k)
        w.index_put_((rows.reshape(-1), cols.reshape(-1)), weight.reshape(-1), accumulate=True)
        return w[:, : self.in_features].contiguous(), self.bias.detach().T.reshape(-1).clone()
