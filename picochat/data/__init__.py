"""Data: document sources (local files, downloaded shards, the builtin offline corpus), the token
cache and the best-fit packing loader.

  sources.py   iter_documents(paths): txt / jsonl / parquet files and directories -> documents
  prepare.py   prepare_shards(paths, out_dir): documents -> parquet shards with a `text` column
  download.py  download_shards(out_dir, n): FineWeb-Edu shards over HTTP (resumable, verified)
  builtin.py   build_builtin_corpus(out_dir): English text from the local Python install
  loader.py    TokenDataset (cached tokens) and PackingLoader (BOS-aligned rows, exact resume)
"""

from picochat.data.sources import iter_documents, list_files

__all__ = ["iter_documents", "list_files"]
