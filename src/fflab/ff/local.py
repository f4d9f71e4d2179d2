"""Locally connected FF layer: local receptive fields without weight sharing.

Each output unit ``(c, i, j)`` sees only the ``C_in x k x k`` window of the input map at
``(i * stride - padding, j * stride - padding)`` (zero outside the image) and has its own
weights: a convolution whose filters differ at every location. This is the layer of the FF
paper's unsupervised MNIST result (local receptive fields + peer normalization).

Layout (chosen so that every product is one batched GEMM on contiguous operands):

- features are flattened maps, ``(C, H, W)`` in, ``(C_out, H_out, W_out)`` out, as in
  ``x.view(N, -1)`` of an NCHW tensor;
- ``weight`` is ``(L, C_out, K)``: ``L = H_out * W_out`` locations (row-major), ``K = C_in * k
  * k`` window entries ordered ``(c_in, dy, dx)`` (``F.unfold``'s order); ``bias`` is
  ``(L, C_out)``;
- the input is gathered, with precomputed indices, into its transposed patches ``P`` (L, K,
  N): row ``(l, kk)`` of ``P`` is the input feature that window entry ``kk`` of location
  ``l`` reads, across the batch (padding reads an appended zero feature). Then ``z' = W P``
  (L, C_out, N) and ``dW = dz' P'`` (L, C_out, K) are batched matrix products over
  locations, with the batch as the long GEMM dimension. Both run over blocks of locations
  whose patches fill a few MiB, each gathered right before its ``bmm`` (see
  :meth:`LocallyConnected2d._blocks`: this is 4-6 times faster than one gather of all
  patches on a 2-core CPU).
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
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        generator: torch.Generator | None = None,
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
        index = self._window_index()
        self.padded = bool((index == self.in_features).any())
        self.register_buffer("index", index.reshape(-1), persistent=False)
        self.weight = nn.Parameter(torch.empty(self.locations, out_channels, self.fan_in))
        self.bias = nn.Parameter(torch.zeros(self.locations, out_channels))
        with torch.no_grad():
            nn.init.normal_(self.weight, 0.0, 1.0 / math.sqrt(self.fan_in), generator)

    def _window_index(self) -> Tensor:
        """(L, K) input feature of each window entry; ``in_features`` where it is padding."""
        c, h, w = self.in_shape
        k, s, p = self.kernel_size, self.stride, self.padding
        _, h_out, w_out = self.out_shape
        rows = (torch.arange(h_out) * s - p).view(-1, 1, 1, 1, 1) + torch.arange(k).view(
            1, 1, 1, k, 1
        )
        cols = (torch.arange(w_out) * s - p).view(1, -1, 1, 1, 1) + torch.arange(k).view(
            1, 1, 1, 1, k
        )
        chan = torch.arange(c).view(1, 1, c, 1, 1)
        inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        flat = (chan * h + rows.clamp(0, h - 1)) * w + cols.clamp(0, w - 1)
        flat = torch.where(inside, flat, torch.full_like(flat, self.in_features))
        return flat.reshape(self.locations, self.fan_in)

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

    def _blocks(self, n: int) -> list[tuple[int, int]]:
        """Runs of locations ``[start, stop)`` whose patches for ``n`` rows fill ~4 MiB.

        The patches of all locations would be ``L * K * N`` values (47 MB for a 5x5 layer of
        12 channels on 14x14 at 200 rows): memory glibc hands out fresh from the OS on every
        call (its mmap threshold cannot exceed 32 MiB), paying a page fault per 4 KiB, and
        that no cache holds. A block is gathered and multiplied while it is in cache.
        """
        per = max(1, (1 << 20) // max(1, self.fan_in * n))
        return [(s, min(s + per, self.locations)) for s in range(0, self.locations, per)]

    def _patch_block(self, ht: Tensor, start: int, stop: int) -> Tensor:
        """Transposed patches ``P[start:stop]`` (stop - start, K, N) from columns ``ht``."""
        idx = self.index[start * self.fan_in : stop * self.fan_in]
        return ht.index_select(0, idx).view(stop - start, self.fan_in, -1)

    def patches(self, h: Tensor) -> Tensor:
        """Transposed patches ``P`` (L, K, N) of the input rows ``h`` (N, in_features)."""
        ht = self._columns(h)
        return ht.index_select(0, self.index).view(self.locations, self.fan_in, -1)

    def forward(self, h: Tensor) -> Tensor:
        """Total input ``z`` (N, out_features) of input rows ``h`` (N, in_features).

        ``z' = W P + b`` per location, one ``bmm`` per block of locations (see
        :meth:`_blocks`). Differentiable with autograd (weight, bias and input). Without a
        graph to record, each block's product is written into one preallocated (L, C_out, N)
        output and the bias added in place: ``baddbmm`` with a broadcast bias, or a ``cat``
        of the blocks, was 2-4 times slower for a 5x5 layer on the CPU VM.
        """
        ht = self._columns(h)
        blocks = self._blocks(h.shape[0])
        if torch.is_grad_enabled() and any(t.requires_grad for t in (h, self.weight, self.bias)):
            zt = torch.cat(
                [torch.bmm(self.weight[s:e], self._patch_block(ht, s, e)) for s, e in blocks]
            )
            zt = zt + self.bias.unsqueeze(2)
        else:
            zt = ht.new_empty(self.locations, self.out_shape[0], h.shape[0])  # (L, C_out, N)
            weight = self.weight.detach()
            for s, e in blocks:
                torch.bmm(weight[s:e], self._patch_block(ht, s, e), out=zt[s:e])
            zt.add_(self.bias.detach().unsqueeze(2))
        return zt.permute(2, 1, 0).reshape(h.shape[0], self.out_features)

    def local_grad(self, h: Tensor, dz: Tensor, sink: GradSink) -> None:
        """Hand ``sink`` the gradients of ``sum(dz * forward(h))`` w.r.t. weight and bias.

        ``h`` (N, in_features), ``dz`` (N, out_features). ``dW = dz' P'`` per location, one
        ``bmm`` per block of locations; ``db`` is the column sum of ``dz``. Both go to
        ``sink(param, grad)`` in the parameter's shape.
        """
        n = h.shape[0]
        if dz.shape != (n, self.out_features):
            raise ValueError(f"expected dz ({n}, {self.out_features}), got {tuple(dz.shape)}")
        ht = self._columns(h)
        c_out = self.out_shape[0]
        dzt = dz.view(n, c_out, self.locations).permute(2, 1, 0).contiguous()  # (L, C_out, N)
        dw = torch.empty_like(self.weight)  # (L, C_out, K)
        for s, e in self._blocks(n):
            torch.bmm(dzt[s:e], self._patch_block(ht, s, e).transpose(1, 2), out=dw[s:e])
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
