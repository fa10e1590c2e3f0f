"""``repsim info`` and ``repsim verify``: what a store holds, and whether every chunk of it reads back."""

from __future__ import annotations

import json
import os
import sys

import click

from repsim.errors import NewerFormatError, UsageError


@click.command()
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the root attributes and layer table as JSON.")
def info(store: str, as_json: bool) -> None:
    """Show a store's provenance, layers with shapes, dtype, size on disk, and whether it is complete."""
    from repsim.formatting import human_bytes  # not hooks.extract.loop: info must not load torch (issue 13)
    from repsim.store.reader import open_store

    s = open_store(store)
    table = [{"layer": layer, **s.layer_info(layer)} for layer in s.layers]
    done = s.chunks_done()
    if as_json:
        click.echo(json.dumps({"attrs": s.attrs, "layers": table, "chunks_done": int(done.sum()),
                               "shards": {str(k): v for k, v in s.shard_records().items()},
                               "n_chunks": len(done), "bytes_on_disk": s.nbytes_on_disk()}, indent=2, default=list))
        return
    a = s.attrs
    m, d, p = a["model"], a["dataset"], a["preprocessing"]
    w = m.get("weights", {})
    wdesc = {"file": f"file {w.get('file')} (sha256 {str(w.get('sha256'))[:12]}...)",
             "random": f"random init (seed {w.get('seed')}, {w.get('init', 'framework')})",
             "factory": f"made by {w.get('factory')} (sha256 {str(w.get('sha256'))[:12]}...)",
             "hub": f"hub {w.get('hub_id') or w.get('tag', '')}@{str(w.get('revision'))[:12]} "
                    f"(sha256 {str(w.get('sha256'))[:12]}...)",
             "bundled": f"bundled {w.get('file')} (sha256 {str(w.get('sha256'))[:12]}...)"}.get(w.get("kind"), str(w))
    state = "complete" if s.complete else f"INCOMPLETE: {int(done.sum())}/{len(done)} chunks (rerun extract to resume)"
    click.echo(f"store      {s.path}  (format {a['format_version']}, repsim {a['repsim_version']})")
    click.echo(f"state      {state}")
    click.echo(f"model      {m['name']}  [{m['source']}:{m['source_id']}]  family {m['family']}, weights: {wdesc}")
    click.echo(f"           prefix tokens {m.get('num_prefix_tokens')}, patch {m.get('patch_size')}, grid {m.get('grid')}")
    click.echo(f"data       {d['name']} {d.get('root') or ''}  n={s.n}, seed {d.get('seed')}, fingerprint {s.fingerprint[:16]}"
               + (f", {len(d.get('skipped', []))} corrupt images skipped" if d.get("skipped") else ""))
    click.echo(f"input      {p['img_size']} px, mean {p['mean']}, std {p['std']}, {p['interpolation']}, crop_pct {p['crop_pct']}")
    if a.get("perturbation"):
        pt = a["perturbation"]
        click.echo(f"perturbed  {pt['kind']}:{pt['level']:g} on the preprocessed input"
                   + (f", {pt['patch_px']} px patches" if pt.get("patch_px") else "")
                   + (f", seed {pt['seed']}" if pt.get("seed") is not None else "") + " (clean sample ids kept)")
    e = a["extraction"]
    click.echo(f"extraction pool {e['pool']}, spatial_pool {e['spatial_pool']}, {e['dtype']}, batch {e['batch_size']}, "
               f"chunk {e['chunk_size']} rows" + (", inputs saved" if e.get("save_inputs") else "")
               + (f", attention statistics ({len(s.attention_layers)} layers, maps of {e.get('attn_keep', 0)} images)"
                  if e.get("attention") else ""))
    g = s.gram_info
    if g:
        click.echo(f"grams      U-centred Grams per chunk of {g['batch_rows']} rows ({g['dtype']}, from {g['source_dtype']} "
                   f"{g['tokens']} features, {g['rows_used']} samples)"
                   + ("; activations not kept (--no-acts)" if not s.has_acts else ""))
    if e.get("float32_layers"):
        click.echo(f"precision  stored as float32 (float16 would lose > 1e-4 of their variation): "
                   f"{', '.join(e['float32_layers'])}")
    click.echo(f"disk       {human_bytes(s.nbytes_on_disk())}")
    for total, records in s.shard_records().items():
        done_k = [f"{k} ({r['host']}, rows {r['rows'][0]}..{r['rows'][1] - 1}, {r['seconds']} s)"
                  for k, r in enumerate(records) if r]
        click.echo(f"shards     {len(done_k)} of {total} recorded finished" + (": " + "; ".join(done_k) if done_k else ""))
    fp16 = s.fp16_errors()
    click.echo(f"layers     {len(s.layers)}" + ("  (fp16 err: worst float16 storage error over the chunks, as a share "
                                                 "of the layer's variation)" if fp16 else ""))
    for row in table:
        extra = ""
        if row["kind"] == "tokens":
            extra = f"prefix {row.get('num_prefix_tokens')}, grid {row.get('grid')}"
        elif row["kind"] == "map":
            extra = f"grid {row.get('grid')}"
        if row["layer"] in fp16 and row["dtype"] == "float16":
            extra += f"{', ' if extra else ''}fp16 err {fp16[row['layer']]:.1e}"
        click.echo(f"  {row['layer']:<36} {row['kind']:<7} {str(tuple(row['shape'])):<18} {row['dtype']:<8} {extra}")


@click.command()
@click.argument("store", type=click.Path())
@click.option("--quiet", is_flag=True, help="No progress bar.")
def verify(store: str, quiet: bool) -> None:
    """Check that every chunk decodes, holds no NaN/Inf, and that the sample fingerprint is consistent.

    Exits with code 1 when a problem is found (each one is listed).
    """
    from repsim.store.reader import open_store
    from repsim.store.verify import verify_store

    try:
        opened = open_store(store)
    except NewerFormatError:
        raise  # intact, only newer than this repsim: one line, exit 2 (not a problem of the store)
    except UsageError as err:
        if not os.path.isfile(os.path.join(store, "zarr.json")):
            raise
        # a folder with root metadata that does not read as a repsim store: its zarr.json is the damage
        click.echo(f"problem: zarr.json (the root metadata) is damaged or not a repsim store's ({err})", err=True)
        click.echo(f"{store}: 1 problem(s)", err=True)
        sys.exit(1)
    report = verify_store(opened, progress=not quiet)
    for problem in report.problems:
        click.echo(f"problem: {problem}", err=True)
    if not report.ok:
        click.echo(f"{store}: {len(report.problems)} problem(s)", err=True)
        sys.exit(1)
    click.echo(f"{store}: ok ({report.layers_checked} arrays, {report.chunks_checked} chunks, no NaN/Inf, fingerprint consistent)")
