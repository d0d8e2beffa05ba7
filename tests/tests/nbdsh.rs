//! nbdsh (libnbd's Python bindings) against ferry: capability flags, every
//! command type, block status, and an out-of-range write that fails with an
//! errno while the connection stays usable.

// Test code: sizes are small u64 constants converted to usize buffer lengths.
#![allow(clippy::cast_possible_truncation)]

use ferry_tests::{
    assert_range_filled, assert_sparse, nbdsh, pattern_bytes, read_at, run, sparse_image, tempdir,
    write_at, Ferry, KIB, MIB,
};

const SCRIPT: &str = r#"
import errno
size = h.get_size()
assert size == 4 * 1024 * 1024, size
for f in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
          "can_cache", "can_multi_conn"):
    assert getattr(h, f)(), f
assert not h.is_read_only()
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)

# block status before any write: hole [0,1M), data [1M,2M), hole [2M,4M)
entries = []
def cb(metacontext, offset, e, err):
    if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
        entries.extend(e)
    return 0
off = 0
while off < size:
    entries.clear()
    h.block_status(size - off, off, cb)
    assert entries, "no extents"
    for i in range(0, len(entries), 2):
        length, flags = entries[i], entries[i + 1]
        end = min(off + length, size)
        for o in range(off, end, 65536):
            is_hole = (flags & nbd.STATE_HOLE) != 0
            is_zero = (flags & nbd.STATE_ZERO) != 0
            in_data = 1048576 <= o < 2097152
            assert is_hole != in_data and is_zero != in_data, (o, length, flags)
        off = end

# data commands
buf = b"\xab" * 65536
h.pwrite(buf, 0)
assert h.pread(65536, 0) == buf
h.pwrite(b"\xcd" * 4096, 65536, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 65536) == b"\xcd" * 4096
h.zero(4096, 0)
assert h.pread(4096, 0) == bytes(4096)
h.zero(4096, 8192, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(4096, 8192) == bytes(4096)
h.zero(4096, 12288, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(4096, 12288) == bytes(4096)
h.trim(65536, 1048576)
assert h.pread(65536, 1048576) == bytes(65536)
h.flush()
h.cache(65536, 0)

# out of range write: an error reply, the connection stays usable
h.set_strict_mode(0)
try:
    h.pwrite(b"x" * 512, size)
    raise AssertionError("write past the end succeeded")
except nbd.Error as ex:
    print("out-of-range errno:", ex.errno)
    assert ex.errnum in (errno.ENOSPC, errno.EINVAL), ex
try:
    h.pread(512, size - 256)
    raise AssertionError("read past the end succeeded")
except nbd.Error as ex:
    assert ex.errnum == errno.EINVAL, ex
assert h.pread(65536, 0)[8192:12288] == bytes(4096)
assert h.pread(4096, 16384) == b"\xab" * 4096
h.pwrite(b"\xef" * 4096, size - 4096)
h.flush()
h.shutdown()
print("nbdsh-ok")
"#;

#[test]
fn commands_flags_block_status_and_errors() {
    let dir = tempdir();
    let img = sparse_image(dir.path(), "sh.img", 4 * MIB);
    let data = pattern_bytes(MIB as usize, 9);
    write_at(&img, MIB, &data);
    assert_sparse(&img);
    let ferry = Ferry::start([&img]);

    let out = run(nbdsh()
        .arg("--base-allocation")
        .args(["-u", &ferry.uri("sh")])
        .args(["-c", SCRIPT]));
    assert!(out.contains("nbdsh-ok"), "{out}");

    ferry.stop_ok();
    assert_range_filled(&img, 0, 4 * KIB, 0);
    assert_range_filled(&img, 4 * KIB, 4 * KIB, 0xab);
    assert_range_filled(&img, 8 * KIB, 8 * KIB, 0);
    assert_range_filled(&img, 16 * KIB, 48 * KIB, 0xab);
    assert_range_filled(&img, 64 * KIB, 4 * KIB, 0xcd);
    assert_range_filled(&img, 68 * KIB, MIB - 68 * KIB, 0);
    assert_range_filled(&img, MIB, 64 * KIB, 0);
    assert_eq!(
        read_at(&img, MIB + 64 * KIB, (MIB - 64 * KIB) as usize),
        data[64 * 1024..]
    );
    assert_range_filled(&img, 2 * MIB, 2 * MIB - 4 * KIB, 0);
    assert_range_filled(&img, 4 * MIB - 4 * KIB, 4 * KIB, 0xef);
    assert_eq!(
        std::fs::metadata(&img).unwrap().len(),
        4 * MIB,
        "image grew"
    );
}
