"""Turn local documents (txt/jsonl/parquet) into parquet shards with one `text` column.

The shards have the same layout as the downloaded FineWeb-Edu shards, so everything downstream
(tokenizer training, the packing loader) reads one format whichever way the data arrived.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from picochat.common import PicochatError, atomic_path, log
from picochat.settings import check, setting
from picochat.data.sources import TEXT_FILES, iter_documents

SHARD_PATTERN = "shard_{index:05d}.parquet"


def write_parquet_atomic(texts: list[str], path: Path, row_group_size: int = 1024) -> None:
    """Write a single-column parquet file via a temporary name, so a crash never leaves half a shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": pa.array(texts, type=pa.string())})
    with atomic_path(path) as tmp:
        # modest row groups: readers stream one row group at a time
        pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd")


def prepare_shards(paths: list[str | Path], out_dir: str | Path, shard_chars: int = 50_000_000,
                   txt_split: str = "paragraphs", overwrite: bool = False) -> list[Path]:
    """Write the documents of `paths` into out_dir/shard_00000.parquet, ... of ~shard_chars each.

    Refuses to mix with existing shards in out_dir unless overwrite=True (then they are removed),
    because a stale shard_00007 left from a bigger run would silently join the data."""
    if shard_chars <= 0:
        raise PicochatError(f"shard_chars must be positive, got {shard_chars}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(out_dir.glob("shard_*.parquet"))
    if existing:
        if not overwrite:
            raise PicochatError(f"{out_dir} already has {len(existing)} shard(s); "
                                "choose an empty directory or pass overwrite")
        for p in existing:
            p.unlink()

    shards: list[Path] = []
    batch: list[str] = []
    chars = docs = total_chars = 0

    def flush() -> None:
        path = out_dir / SHARD_PATTERN.format(index=len(shards))
        write_parquet_atomic(batch, path)
        shards.append(path)

    for doc in iter_documents(paths, txt_split=txt_split):
        batch.append(doc)
        chars += len(doc)
        docs += 1
        total_chars += len(doc)
        if chars >= shard_chars:
            flush()
            batch, chars = [], 0
    if batch:
        flush()
    size = sum(p.stat().st_size for p in shards)
    log(f"prepared {len(shards)} shard(s) in {out_dir}: {docs:,} documents, {total_chars:,} characters, "
        f"{size / 1e6:.1f} MB on disk")
    return shards


@dataclass
class PrepareConfig:
    data: list[str] = setting(help=f"the text to shard: {TEXT_FILES}")
    save: str = setting(help="output directory")
    shard_chars: int = setting(50_000_000, "characters per shard", low=1)


def prepare(cfg: PrepareConfig) -> list[Path]:
    """`picochat data prepare`."""
    check(cfg)
    return prepare_shards(cfg.data, cfg.save, shard_chars=cfg.shard_chars)
