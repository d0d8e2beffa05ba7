//! Encrypted, deduplicating block cache with a RocksDB signature index. Not yet built: see the cache issue.
