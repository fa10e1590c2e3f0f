"""The activation store: one model × one ordered list of samples × one preprocessing, as a Zarr v3 group.

This package docstring is the format specification (``FORMAT_VERSION`` in :mod:`repsim.store.format`).
Everything downstream of extraction reads only this. The package reads in the order data flows:
:mod:`~repsim.store.format` (version, codecs, dimension names, digests), :mod:`~repsim.store.locks` (one
writer per store or shard), :mod:`~repsim.store.writer` (:class:`StoreWriter`), :mod:`~repsim.store.reader`
(:class:`ActivationStore`, :func:`open_store`), :mod:`~repsim.store.verify` (``repsim verify``) and
:mod:`~repsim.store.remote` (extraction into an fsspec URL: stage locally, then upload).

Layout::

    model.zarr/
      zarr.json                 root attributes, key "repsim" (see below)
      samples/ids               (n,) str      sample ids in store order
      samples/labels            (n,) int64    class index, -1 where unknown
      inputs/pixels             (n, 3, H, W)  optional: the preprocessed model input (``--save-inputs``)
      acts/<layer>              (n, ...)      one array per captured layer, in network order:
                                              (n, T, D) tokens | (n, C, H, W) maps | (n, D) vectors
      attn/<layer>/...          optional (``--attention``): per-image attention statistics of one attention
                                layer (see "Attention" below)
      grams/<layer>             optional (``--grams``): (n_chunks, m(m-1)/2) float32, row c = the strict upper
                                triangle (row-major, ``torch.triu_indices(m, m, 1)``) of the U-centred linear
                                Gram (Székely–Rizzo 2014) of the flattened, per-batch column-centred features
                                of sample chunk c (m = its row count; m = chunk_size but for the last chunk,
                                whose unused tail is 0). These are exactly the per-batch terms of minibatch
                                CKA (Nguyen et al. 2021) with the store's chunks as batches: the diagonal of a
                                U-centred Gram is 0, so ⟨K̃,L̃⟩ = 2·⟨triu K̃, triu L̃⟩ and the factor 2 cancels.
                                A last chunk of fewer than 4 rows has no unbiased Gram: its row is all 0 and
                                its samples are left out (root attribute ``grams.rows_used``).
      quality/fp16_error        (n_chunks, n_layers) float32: per chunk and layer, the float16 storage error η
                                (see "Precision") measured on the chunk's first rows; 0 for float32 layers
      progress/chunk_digest     (n_chunks, k) uint32: CRC32C of the decoded bytes each chunk wrote into each of
                                the k arrays named in the root attribute ``digest_arrays`` (activations,
                                inputs, extra arrays), written before the chunk's flag. Every chunk object
                                also carries the CRC32C of its own bytes; this digest is what finds two
                                intact chunks of one array exchanged (``repsim verify``)
      progress/chunk_done       (n_chunks,) uint8, one Zarr chunk per flag: 1 once every array's rows of
                                that sample chunk are on disk
      progress/shards_of_<N>    optional, (N,) str, one Zarr chunk per shard: written by a ``--shard k/N``
                                run once all its chunks are flagged: JSON {shard, of, chunks [start, stop),
                                rows [start, stop), host, pid, finished (UTC ISO 8601), seconds}; "" until then

Root attribute ``repsim`` (JSON)::

    format_version, repsim_version, created (UTC ISO 8601),
    model          {name, source, source_id, family, weights{kind, file, sha256 | tag}, num_prefix_tokens,
                    patch_size, grid, num_classes}
    dataset        {name, root, n, seed, fingerprint (sha256 of "\\n".join(ids)), classes, params, skipped[]}
    preprocessing  {img_size, mean, std, interpolation, crop_pct, crop_mode}
    extraction     {pool, spatial_pool, dtype, batch_size, chunk_size, layers_requested, save_inputs, grams,
                    acts (false with ``--no-acts``: no ``acts/`` arrays, Grams only)}
    grams          optional: {batch_rows (= chunk_size), dtype, tokens ("flatten"), source_dtype (the values
                    the Grams were computed from: the stored dtype, or float32 without activations),
                    rows_used}
    layers         [layer names in network order]
    perturbation   optional (``--perturb``, :mod:`repsim.data.perturbations`): {kind, level, patch_px (patch-drop's
                    grid in input pixels, else null), seed (null for the deterministic occlude-centre)}: every
                    preprocessed input was perturbed, seeded per sample id. ``dataset`` (ids, fingerprint) stays
                    the clean data set's, so a clean and a perturbed store compare row by row; absent: clean
    config_hash    sha256 of the canonical JSON of everything above that determines the arrays' contents
    libraries      {python, torch, timm, zarr, numpy, ...}
    complete       bool; completed (UTC ISO 8601) once complete

Precision: activations are stored as float16 unless ``--dtype float32``. Float16 keeps 11 significant
bits: a value v is stored with an error of at most |v|·2^-11 (and 2^-25 absolute below 6.1e-5; values under
about 3e-8 become 0, values over 65504 overflow and are refused). What matters to CKA and probes is the
error relative to a layer's variation about its per-feature mean, η = Σ(fp16(x) − x)² / Σ(x − x̄)²: about
2e-8 for well-scaled features, but near 1 when a large per-feature offset (massive activations) or tiny
values (underflow) swamp the variation. At planning, η is measured per layer on the first images; a layer
with η > ``FP16_MAX_ERROR`` (1e-4) is stored as float32 instead (per-layer attributes ``dtype`` and
``fp16_error``). During extraction η is measured again on every chunk (``quality/fp16_error``); ``repsim
info`` shows each layer's worst chunk and ``repsim verify`` fails on a float16 layer above the limit.

Per-layer attributes (``acts/<layer>`` zarr.json): ``kind`` (tokens | map | vector), ``module`` (module path),
``call_index`` (which call of a module used several times per forward, else null), ``tap`` (what was taken
from the module output, e.g. "output" or "output[0]"), ``layout_in`` (the module's native layout, e.g. nhwc),
``pool`` (the pooling actually applied), ``num_prefix_tokens`` and ``grid`` (tokens: how many leading tokens
are CLS / register / distillation tokens, and the (gh, gw) patch grid of the rest; null where unknown),
``shape`` (per-sample shape).

Attention (optional; root attribute ``attention`` = {layers: [...], attn_keep: K, info: {layer: {kind,
num_heads, num_prefix_tokens, grid, patch_size (token stride in input pixels), window_size, shift_size,
query_map}}})::

      attn/<layer>/distance     (n, heads) float32  mean attention distance in pixels
      attn/<layer>/prefix_mass  (n, heads) float32  attention on prefix tokens (mean over patch queries)
      attn/<layer>/entropy      (n, heads) float32  row entropy in nats (mean over patch queries)
      attn/<layer>/aligned      (n_chunks, heads, 2gh-1, 2gw-1) float32  per-sample-chunk sums of the
                                     aligned attention maps (Walmer et al. 2023); sum over axis 0 for the total
      attn/<layer>/query_map    (n, heads, gh·gw) float32  per image: the CLS query's attention over the patch
                                     keys renormalised over them, or without prefix tokens the mean patch
                                     query's (info ``query_map``: "cls" | "mean"); for attention as
                                     segmentation (:mod:`repsim.attention.segmentation`). Global-attention
                                     layers only; float32 (4·heads·gh·gw bytes per image, 3 % of ViT-B/16's
                                     float16 tokens) keeps the small weights that the mass rule sums. Stores
                                     written before it existed lack it: re-extract with ``--attention``
      attn/<layer>/maps         (K, heads, N, N) float16  full probabilities of the first K images
                                     (global-attention layers only)

Extra arrays are declared in the root attribute ``extra_arrays`` = [{name, rows}] where ``rows`` says how
the first axis relates to samples: ``samples`` (one row per sample), ``chunks`` (one row per sample chunk)
or ``first`` (one row per sample for the first rows only).

Dimension names: every array carries Zarr v3 ``dimension_names`` (:func:`dimension_names`), so each group opens
in xarray (``xr.open_zarr(path, group="acts", consolidated=False)``) with named axes. xarray needs one size per
name within a group, hence the qualified and distinct names below::

    samples/ids, samples/labels     (sample,)
    inputs/pixels                   (sample, channel, height, width)
    acts/<layer>                    tokens (sample, token:<layer>, channel:<layer>) | map (sample, channel:<layer>,
                                    height:<layer>, width:<layer>) | vector (sample, channel:<layer>): layers
                                    share the group and differ in size, so their axes carry the layer name
    attn/<layer>/distance, prefix_mass, entropy   (sample, head)
    attn/<layer>/aligned            (chunk, head, dy, dx)          dy, dx: offsets -(g-1)..g-1 from the query
    attn/<layer>/cls_map            (chunk, head, grid_y, grid_x)
    attn/<layer>/query_map          (sample, head, patch)
    attn/<layer>/maps               (kept_sample, head, query, key)  kept_sample: the first K images only
    grams/<layer>                   (chunk, pair)                  pair: the packed strict upper triangle
    quality/fp16_error              (chunk, layer)                 layer: in the order of root ``layers``
    progress/chunk_done             (chunk,)
    progress/chunk_digest           (chunk, digest_array)          digest_array: root ``digest_arrays`` order
    progress/shards_of_<N>          (shard_of_<N>,)

An extra array the table does not name gets its first axis from ``rows`` (sample | chunk | kept_sample) and
``<array>_<i>`` after it. Names are metadata only: stores written before they existed have none and read in
repsim exactly as before (xarray refuses arrays without ``dimension_names``; re-extract to get them).

Chunking: every array is chunked along samples only (``chunk_size`` rows, whole feature dims per chunk),
stored uncompressed (activations compress only 1.15-1.4x whatever the codec, and compression slowed the
writer by 1.4x, see issue #14's note) with a CRC32C checksum per chunk (a damaged chunk raises on decoding;
older stores, Blosc lz4 + bitshuffle without checksum, read as before). Float arrays have fill value NaN,
so a chunk that is missing on disk reads as NaN and every analysis refuses it instead of reading zeros;
``progress/chunk_digest`` finds intact chunks that were exchanged. All arrays share ``chunk_size`` so a
sample chunk is the unit of writing,
resuming and (later) sharding. Exactly one writer touches a chunk (Zarr loses data when several writers
share one chunk or shard). Sample order is a seeded random permutation of the data set (see
:mod:`repsim.data.sources`), so any contiguous block of rows is a uniform random sample.
"""

from repsim.store.format import (
    ATTR_KEY,
    FORMAT_VERSION,
    FP16_MAX_ERROR,
    chunk_digest,
    config_hash,
    dimension_names,
    fingerprint_ids,
    is_url,
    layer_kind,
)
from repsim.store.locks import WriterLock
from repsim.store.reader import ActivationStore, StoreLike, check_layer_names, gather_rows, is_store, open_store
from repsim.store.writer import ArraySpec, LayerSpec, StoreWriter, remove_store

__all__ = [
    "ATTR_KEY", "FORMAT_VERSION", "FP16_MAX_ERROR", "ActivationStore", "ArraySpec", "LayerSpec", "StoreLike",
    "StoreWriter", "WriterLock", "check_layer_names", "chunk_digest", "config_hash", "dimension_names",
    "fingerprint_ids", "gather_rows", "is_store", "is_url", "layer_kind", "open_store", "remove_store",
]
