"""Blockwise quantization formats, bit-compatible with bitsandbytes.

A kernel is quantized as a matrix ``m`` of shape ``stack + (out, in)`` (torch's
row-major ``(out, in)`` order: blocks of ``block_size`` run along the input
axis, as in bitsandbytes' ``quantize_4bit(W.T)``):

* ``nf4`` (bitsandbytes' NormalFloat4), ``int4`` (symmetric linear, 15
  levels ``k/7``), ``int8`` (symmetric linear, 255 levels ``k/127``): each
  block is scaled by its absolute maximum (float32) and every value is
  rounded to the nearest codebook entry (ties to the lower one, as
  ``torch.bucketize`` on the midpoints does). 4-bit codes are packed two per
  byte, the first value in the high nibble (bitsandbytes' order).
* double quantization (bitsandbytes' ``compress_statistics=True``): the
  absmax values of one kernel (one layer of a stack) minus their mean are
  quantized with bitsandbytes' blockwise *dynamic* 8-bit map in blocks of 256,
  with the rounding of bitsandbytes' CPU kernel (a 65536-entry lookup table
  over [-1, 1]).

Dequantization is ``code[q] * absmax`` in float32, then a cast: the values
bitsandbytes' ``dequantize_4bit`` returns.
"""

import numpy as np
import jax
import jax.numpy as jnp

NESTED_BLOCK = 256  # bitsandbytes' block size for double quantization

# bitsandbytes.functional.get_4bit_type("nf4"), float32.
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)

# bitsandbytes.functional.create_dynamic_map() (signed, 8 bits): float32 bit
# patterns, little-endian.
_DYNAMIC_HEX = (
    "33337ebf9a997abf000077bf666673bfcdcc6fbf33336cbf9a9968bf000065bf666661bfcdcc5dbf33335abf"
    "9a9956bf000053bf66664fbfcdcc4bbf333348bf9a9944bf000041bf66663dbfcdcc39bf343336bf9a9932bf"
    "00002fbf66662bbfcdcc27bf343324bf9a9920bf00001dbf666619bfcdcc15bf343312bf9a990ebf00000bbf"
    "666607bfcccc03bf333300bf3233f9be0000f2becccceabe9a99e3be6666dcbe3333d5be0000cebeccccc6be"
    "9a99bfbe6666b8be3333b1be0000aabecccca2be9a999bbe666694be34338dbe000086be99997dbe33336fbe"
    "cdcc60be666652be000044be9a9935be333327becdcc18be66660abe0000f8bd3433dbbd85ebc9bdf728c4bd"
    "6766bebdd7a3b8bd48e1b2bdb81eadbd2a5ca7bd9a99a1bd0ad79bbd7b1496bdeb5190bd5d8f8abdcdcc84bd"
    "7b147ebd5d8f72bd3d0a67bd1f855bbd000050bde17a44bdc3f538bda3702dbd85eb21bd676616bd48e10abd"
    "52b8febc15aee7bcd7a3d0bc9a99b9bc5d8fa2bc1f858bbcc3f568bc48e13abc643b1fbc180416bccdcc0cbc"
    "819503bc6abcf4bbd34de2bb3bdfcfbba470bdbb0d02abbb749398bbdd2486bb8a6c67bb5c8f42bb2db21dbb"
    "fca9f1ba9defa7baff6577ba3ee859ba806a3cbac1ec1eba016f01ba83e2c7b905e78cb90bd723b94b1fbab8"
    "b3ef8ab8348037b80642b2b7ff0502b7941a5ab6b7a313b500000000b7a31335941a5a36ff0502370642b237"
    "34803738b3ef8a384b1fba380bd7233905e78c3983e2c739016f013ac1ec1e3a806a3c3a3ee8593aff65773a"
    "9defa73afca9f13a2db21d3b5c8f423b8a6c673bdd24863b7493983b0d02ab3ba470bd3b3bdfcf3bd34de23b"
    "6abcf43b8195033ccdcc0c3c1804163c643b1f3c48e13a3cc3f5683c1f858b3c5d8fa23c9a99b93cd7a3d03c"
    "15aee73c52b8fe3c48e10a3d6766163d85eb213da3702d3dc3f5383de17a443d0000503d1f855b3d3d0a673d"
    "5d8f723d7b147e3dcdcc843d5d8f8a3deb51903d7b14963d0ad79b3d9a99a13d2a5ca73db81ead3d48e1b23d"
    "d7a3b83d6766be3df728c43d85ebc93d3433db3d0000f83d66660a3ecdcc183e3333273e9a99353e0000443e"
    "6666523ecdcc603e33336f3e99997d3e0000863e34338d3e6666943e9a999b3ecccca23e0000aa3e3333b13e"
    "6666b83e9a99bf3eccccc63e0000ce3e3333d53e6666dc3e9a99e33eccccea3e0000f23e3233f93e3333003f"
    "cccc033f6666073f00000b3f9a990e3f3433123fcdcc153f6666193f00001d3f9a99203f3433243fcdcc273f"
    "66662b3f00002f3f9a99323f3433363fcdcc393f66663d3f0000413f9a99443f3333483fcdcc4b3f66664f3f"
    "0000533f9a99563f33335a3fcdcc5d3f6666613f0000653f9a99683f33336c3fcdcc6f3f6666733f0000773f"
    "9a997a3f33337e3f0000803f"
)
DYNAMIC = np.frombuffer(bytes.fromhex(_DYNAMIC_HEX), "<f4").astype(np.float32)

CODEBOOKS = {
    "nf4": NF4,
    # code 0 (-8/7) is never chosen: values are clipped to [-1, 1]
    "int4": ((np.arange(16) - 8) / 7).astype(np.float32),
    # code 0 (-128/127) is never chosen
    "int8": ((np.arange(256) - 128) / 127).astype(np.float32),
}
BITS = {"nf4": 4, "int4": 4, "int8": 8}


def _midpoints(code: np.ndarray) -> jax.Array:
  return jnp.asarray((code[:-1] + code[1:]) / np.float32(2), jnp.float32)


def _dynamic_lut() -> np.ndarray:
  """bitsandbytes' CPU lookup table: 65536 bins of [-1, 1] -> nearest code."""
  mid = (np.float32(0.5) * (DYNAMIC[:-1] + DYNAMIC[1:])).astype(np.float32)
  i = np.arange(65536, dtype=np.float32)
  val = (np.float32(-1.0) + (np.float32(2.0) * i) / np.float32(65535)).astype(np.float32)
  return np.searchsorted(mid, val, side="left").astype(np.uint8)


_LUT = _dynamic_lut()


def pack4(q: jax.Array) -> jax.Array:
  """Two 4-bit codes per byte along the last axis, the first in the high nibble."""
  q = q.astype(jnp.uint8)
  return (q[..., 0::2] << 4) | q[..., 1::2]


def unpack4(packed: jax.Array) -> jax.Array:
  hi, lo = packed >> 4, packed & jnp.uint8(0xF)
  return jnp.stack([hi, lo], axis=-1).reshape(packed.shape[:-1] + (-1,))


def quantize_blocks(m: jax.Array, kind: str, block_size: int):
  """Codes (packed for 4 bits) and float32 absmax of ``m`` (..., out, in)."""
  x = m.astype(jnp.float32)
  blocks = x.reshape(x.shape[:-1] + (x.shape[-1] // block_size, block_size))
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  inv = 1.0 / jnp.maximum(absmax, jnp.float32(1e-38))
  scaled = jnp.clip(blocks * inv[..., None], -1.0, 1.0).reshape(x.shape)
  q = _nearest(scaled, kind).astype(jnp.uint8)
  return (pack4(q) if BITS[kind] == 4 else q), absmax


def _nearest(v: jax.Array, kind: str) -> jax.Array:
  """Index of the nearest codebook entry (ties to the lower one): the number of
  midpoints below ``v``, as ``torch.bucketize`` / ``searchsorted`` count them."""
  mids = _midpoints(CODEBOOKS[kind])
  if BITS[kind] == 4:  # 15 comparisons, fused into one pass
    return jnp.searchsorted(mids, v, side="left", method="compare_all")
  # int8: the codebook is uniform ((k - 128) / 127), so round, then settle the
  # answer with the two midpoints around it (no 255-way comparison)
  c = jnp.clip(jnp.round(v * 127.0).astype(jnp.int32) + 128, 1, 255)
  padded = jnp.concatenate([mids, jnp.full((1,), jnp.inf, jnp.float32)])
  return (c - 1 + (v > padded[c - 1]).astype(jnp.int32)
          + (v > padded[c]).astype(jnp.int32))


def dequantize_blocks(codes: jax.Array, absmax: jax.Array, kind: str, dtype):
  """``code[q] * absmax`` (float32) cast to ``dtype``: shape (..., out, in)."""
  q = unpack4(codes) if BITS[kind] == 4 else codes
  vals = jnp.asarray(CODEBOOKS[kind])[q.astype(jnp.int32)]
  nb = absmax.shape[-1]
  vals = vals.reshape(vals.shape[:-1] + (nb, -1)) * absmax[..., None]
  return vals.reshape(q.shape).astype(dtype)


def _flat_blocks(x: jax.Array, block: int):
  """``x`` (..., n) padded with zeros to whole blocks: (..., n_blocks, block)."""
  n = x.shape[-1]
  pad = -n % block
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  return x.reshape(x.shape[:-1] + (-1, block))


def quantize_absmax(absmax: jax.Array):
  """bitsandbytes' double quantization of one kernel's absmax (per stack entry).

  Returns ``(codes uint8 like absmax, absmax2 float32 (..., n_blocks),
  offset float32 (...))``.
  """
  lead = absmax.shape[:-2]
  flat = absmax.reshape(lead + (-1,))
  # torch's mean is its float32 sum / n; the sum here is the correctly rounded
  # one (a float32 sum plus the sum of residuals). torch's own summation order
  # is not reproducible, so the offset may differ from bitsandbytes' by 1 ulp.
  n = flat.shape[-1]
  rough = jnp.sum(flat, axis=-1)
  total = rough + jnp.sum(flat - rough[..., None] / n, axis=-1)
  offset = total / jnp.float32(n)
  x = flat - offset[..., None]
  blocks = _flat_blocks(x, NESTED_BLOCK)
  am2 = jnp.max(jnp.abs(blocks), axis=-1)
  inv = 1.0 / jnp.where(am2 == 0, jnp.float32(1), am2)
  v = jnp.clip(blocks * inv[..., None], -1.0, 1.0)
  idx = ((v + 1.0) * 0.5 * 65535.0 + 0.5).astype(jnp.uint16)
  q = jnp.asarray(_LUT)[idx.astype(jnp.int32)]
  q = jnp.where((am2 == 0)[..., None], jnp.uint8(0), q)
  q = q.reshape(lead + (-1,))[..., :flat.shape[-1]]
  return q.reshape(absmax.shape), am2, offset


def dequantize_absmax(codes: jax.Array, absmax2: jax.Array, offset: jax.Array):
  """Inverse of ``quantize_absmax``: float32 absmax shaped like ``codes``."""
  lead = codes.shape[:-2]
  flat = codes.reshape(lead + (-1,))
  n = flat.shape[-1]
  vals = jnp.asarray(DYNAMIC)[_flat_blocks(flat, NESTED_BLOCK).astype(jnp.int32)]
  vals = (vals * absmax2[..., None]).reshape(lead + (-1,))[..., :n]
  return (vals + offset[..., None]).reshape(codes.shape)
