"""The kernels as torch ops (`torch.library.custom_op` with fake implementations, so torch.compile and
torch.export keep them as single nodes), and the one-time re-layout of packed weights into kernel panels."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from didbq.runtime.build import require_kernels

PANEL = 8  # weight columns per panel (one 512-bit vector of 64-bit words)
TILE = 48  # columns of the widest tile: panels are padded to a multiple of it


def words(columns: int) -> int:
    """64-bit words per packed row of `columns` signs."""
    return (columns + 63) // 64


def weight_panels(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """Packed signs as stored ([rows, bytes] uint8 or [rows, words] int32, little-endian bits, bit 1 = +1) ->
    the kernel's panels: int64 [ceil(rows / 48) * 6, words(columns), 8], column n in lane n % 8 of panel n // 8,
    padding bits and padding columns zero."""
    array = packed.detach().cpu().contiguous().numpy()
    if array.dtype != np.uint8:
        array = array.astype("<i4", copy=False).view(np.uint8)
    rows, row_words = array.shape[0], words(columns)
    padded_rows = -(-rows // TILE) * TILE
    as_bytes = np.zeros((padded_rows, row_words * 8), dtype=np.uint8)
    used = min(array.shape[1], row_words * 8)
    as_bytes[:rows, :used] = array[:, :used]
    bits = as_bytes.view("<u8").copy()
    if columns % 64:
        bits[:, -1] &= np.uint64((1 << (columns % 64)) - 1)  # a file's padding bits must not count
    panels = bits.reshape(padded_rows // PANEL, PANEL, row_words).transpose(0, 2, 1)
    return torch.from_numpy(np.ascontiguousarray(panels).view(np.int64))


def _pointer(tensor: Optional[torch.Tensor]) -> Optional[int]:
    return None if tensor is None else tensor.data_ptr()


def float_vector(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """What the kernels take for shift, alpha and bias: a contiguous fp32 vector without autograd history."""
    return None if tensor is None else tensor.detach().to(torch.float32).reshape(-1).contiguous()


def _binary_linear(x: torch.Tensor, shift: Optional[torch.Tensor], panels: torch.Tensor, alpha: torch.Tensor,
                   bias: Optional[torch.Tensor], out_features: int, isa: str = "") -> torch.Tensor:
    kernels = require_kernels()
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.to(torch.float32).contiguous()
    rows, columns = x.shape
    y = torch.empty(rows, out_features, dtype=torch.float32)
    kernels.library.didbq_binary_linear(
        x.data_ptr(), _pointer(shift), rows, columns, panels.data_ptr(), out_features, alpha.data_ptr(),
        _pointer(bias), y.data_ptr(), kernels.isa_number(isa or None), torch.get_num_threads())
    return y


@torch.library.custom_op("didbq::binary_linear", mutates_args=(), device_types="cpu")
def binary_linear(x: torch.Tensor, shift: Optional[torch.Tensor], panels: torch.Tensor, alpha: torch.Tensor,
                  bias: Optional[torch.Tensor], out_features: int, isa: str = "") -> torch.Tensor:
    """y[m, n] = (K - 2 popcount(bits(x[m] + shift) XOR w[n])) * alpha[n] + bias[n] for x [M, K]; the bits of x
    are 1 where x + shift >= 0; shift, alpha and bias are contiguous fp32 vectors. `isa` forces a code path
    (avx512, avx2, portable); "" takes the selected one."""
    return _binary_linear(x, shift, panels, alpha, bias, out_features, isa)


@binary_linear.register_fake
def _binary_linear_shape(x: torch.Tensor, shift: Optional[torch.Tensor], panels: torch.Tensor,
                         alpha: torch.Tensor, bias: Optional[torch.Tensor], out_features: int,
                         isa: str = "") -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features, dtype=torch.float32)


def pack_rows(x: torch.Tensor, shift: Optional[torch.Tensor] = None, isa: str = "") -> torch.Tensor:
    """Sign bits of the rows of x [M, K] (x + shift >= 0), int64 [M, words(K)]: what the kernel packs."""
    kernels = require_kernels()
    x = x.detach().to(torch.float32).contiguous()
    shift = float_vector(shift)
    bits = torch.empty(x.shape[0], words(x.shape[1]), dtype=torch.int64)
    kernels.library.didbq_pack_rows(x.data_ptr(), _pointer(shift), x.shape[0], x.shape[1], bits.data_ptr(),
                                    kernels.isa_number(isa or None), torch.get_num_threads())
    return bits


PROBABILITY_KINDS = ("threshold", "bit", "bivit")  # the C code's numbers are the positions


def _binary_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_shift: Optional[torch.Tensor],
                      k_shift: Optional[torch.Tensor], v_shift: Optional[torch.Tensor], prob_scale: torch.Tensor,
                      scale: float, kind: str, ensure_one_key: bool, isa: str = ""
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    kernels = require_kernels()
    q, k, v = (t if t.dtype == torch.float32 and t.stride(-1) == 1 else t.to(torch.float32).contiguous()
               for t in (q, k, v))  # any strides with contiguous rows: no copy of timm's permuted q, k, v
    batch, heads, queries, dim = q.shape
    out = torch.empty(batch, heads, queries, dim, dtype=torch.float32)
    counts = torch.empty(batch, heads, queries, 1, dtype=torch.float32)
    strides = torch.tensor([s for t in (q, k, v) for s in t.stride()[:3]], dtype=torch.int64)
    kernels.library.didbq_binary_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), strides.data_ptr(), batch, heads, queries, k.shape[-2], dim,
        _pointer(q_shift), _pointer(k_shift), _pointer(v_shift), scale, PROBABILITY_KINDS.index(kind),
        prob_scale.data_ptr(), int(ensure_one_key), out.data_ptr(), counts.data_ptr(),
        kernels.isa_number(isa or None), torch.get_num_threads())
    return out, counts


@torch.library.custom_op("didbq::binary_attention", mutates_args=(), device_types="cpu")
def binary_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_shift: Optional[torch.Tensor],
                     k_shift: Optional[torch.Tensor], v_shift: Optional[torch.Tensor], prob_scale: torch.Tensor,
                     scale: float, kind: str, ensure_one_key: bool, isa: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """The binary attention core on [batch, heads, tokens, dim] tensors, fused (kernels.c): sign bits of q, k, v
    (x + shift >= 0), scores (dim - 2 popcount(q ^ k)) * scale, softmax, the {0, 1} mask of `kind` (threshold,
    bit, bivit) with the row maximum kept if `ensure_one_key`, and a * mask @ sign(v) by popcount; a is
    `prob_scale` per head. Returns (out, ones per row [..., tokens, 1])."""
    return _binary_attention(q, k, v, q_shift, k_shift, v_shift, prob_scale, scale, kind, ensure_one_key, isa)


@binary_attention.register_fake
def _binary_attention_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_shift: Optional[torch.Tensor],
                            k_shift: Optional[torch.Tensor], v_shift: Optional[torch.Tensor],
                            prob_scale: torch.Tensor, scale: float, kind: str, ensure_one_key: bool,
                            isa: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), q.new_empty(*q.shape[:-1], 1)


def call(op: str, *args: Any) -> Any:
    """Run the op `op` ("binary_linear", "binary_attention") as a graph node while torch.compile or torch.export
    traces (fake or traced tensors), and its implementation directly otherwise: the op's dispatch costs about
    20 us a call, 1 ms a DeiT-S forward."""
    if type(args[0]) is torch.Tensor and not torch.compiler.is_compiling():
        return _IMPLEMENTATIONS[op](*args)
    return getattr(torch.ops.didbq, op)(*args)


_IMPLEMENTATIONS = {"binary_linear": _binary_linear, "binary_attention": _binary_attention}
