//! A reader for what the writer writes: TFRecord framing with both CRCs checked, and the
//! `Event` fields decoded from the wire format.

use super::record::{crc32c, masked_crc32c, put_varint};
use super::*;

/// One decoded `Event`: wall time, step, file version, and its `(tag, simple_value)` pairs.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Decoded {
    pub(crate) wall_time: f64,
    pub(crate) step: i64,
    pub(crate) file_version: Option<String>,
    pub(crate) values: Vec<(String, f32)>,
}

/// The complete, CRC-valid records at the start of `bytes`, and whether anything followed
/// them (a truncated or corrupt tail, which TensorBoard's reader also stops at).
pub(crate) fn read_records(bytes: &[u8]) -> (Vec<Vec<u8>>, bool) {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        if rest.len() < 12 {
            return (out, true);
        }
        let (len, tail) = rest.split_at(8);
        let crc = u32::from_le_bytes(tail[..4].try_into().unwrap());
        if crc != masked_crc32c(len) {
            return (out, true);
        }
        let n = u64::from_le_bytes(len.try_into().unwrap()) as usize;
        let tail = &tail[4..];
        if tail.len() < n + 4 {
            return (out, true);
        }
        let (data, tail) = tail.split_at(n);
        if u32::from_le_bytes(tail[..4].try_into().unwrap()) != masked_crc32c(data) {
            return (out, true);
        }
        out.push(data.to_vec());
        rest = &tail[4..];
    }
    (out, false)
}

fn varint(b: &mut &[u8]) -> u64 {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (byte, rest) = b.split_first().expect("varint runs past the end");
        *b = rest;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return v;
        }
    }
    panic!("varint longer than 10 bytes")
}

/// The fields of one message: (field number, wire type, varint value or payload bytes).
fn fields(mut b: &[u8]) -> Vec<(u32, u8, u64, Vec<u8>)> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b);
        let (field, wire) = ((key >> 3) as u32, (key & 7) as u8);
        let (v, payload) = match wire {
            0 => (varint(&mut b), vec![]),
            1 => {
                let (p, r) = b.split_at(8);
                b = r;
                (0, p.to_vec())
            }
            2 => {
                let n = varint(&mut b) as usize;
                let (p, r) = b.split_at(n);
                b = r;
                (0, p.to_vec())
            }
            5 => {
                let (p, r) = b.split_at(4);
                b = r;
                (0, p.to_vec())
            }
            w => panic!("unexpected wire type {w}"),
        };
        out.push((field, wire, v, payload));
    }
    out
}

/// Decodes an `Event`, asserting the wire types the schema gives each field.
pub(crate) fn decode_event(data: &[u8]) -> Decoded {
    let mut e = Decoded::default();
    for (field, wire, v, p) in fields(data) {
        match (field, wire) {
            (1, 1) => e.wall_time = f64::from_le_bytes(p.try_into().unwrap()),
            (2, 0) => e.step = v as i64,
            (3, 2) => e.file_version = Some(String::from_utf8(p).unwrap()),
            (5, 2) => {
                for (f, w, _, value) in fields(&p) {
                    assert_eq!((f, w), (1, 2), "Summary.value");
                    let (mut tag, mut x) = (String::new(), f32::NAN);
                    for (f, w, _, q) in fields(&value) {
                        match (f, w) {
                            (1, 2) => tag = String::from_utf8(q).unwrap(),
                            (2, 5) => x = f32::from_le_bytes(q.try_into().unwrap()),
                            other => panic!("unexpected Summary.Value field {other:?}"),
                        }
                    }
                    e.values.push((tag, x));
                }
            }
            (10, 2) => {}
            other => panic!("unexpected Event field {other:?}"),
        }
    }
    e
}

/// Every event in the one event file in `dir`.
pub(crate) fn read_dir_events(dir: &Path) -> Vec<Decoded> {
    let files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents."))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let (records, truncated) = read_records(&std::fs::read(&files[0]).unwrap());
    assert!(!truncated);
    records.iter().map(|r| decode_event(r)).collect()
}

#[test]
fn crc32c_matches_the_standard_check_values() {
    // The CRC catalogue's check value for CRC-32/ISCSI, and RFC 3720's 32 zero bytes.
    assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    assert_eq!(crc32c(b""), 0);
    // tensorboard.compat.tensorflow_stub.pywrap_tensorflow.masked_crc32c(b"123456789")
    assert_eq!(masked_crc32c(b"123456789"), 0xc78a_b0e5);
}

#[test]
fn varints_encode_as_protobuf() {
    let enc = |v: u64| {
        let mut b = Vec::new();
        put_varint(&mut b, v);
        b
    };
    assert_eq!(enc(0), [0]);
    assert_eq!(enc(1), [1]);
    assert_eq!(enc(300), [0xac, 0x02]);
    assert_eq!(enc(-1i64 as u64), [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
    for v in [0, 127, 128, 16_383, 16_384, u64::MAX, 1 << 63] {
        assert_eq!(varint(&mut enc(v).as_slice()), v);
    }
}

/// The records torch 2.11's `SummaryWriter` (tensorboard 2.21) writes for
/// `w.add_scalar("train/loss", 0.1, 3, walltime=1.5e9 + 0.25)` and
/// `w.add_scalar("x", -2.5, -7, walltime=1.7e9)`, byte for byte.
#[test]
fn scalar_records_match_torch_summary_writer() {
    let hex = |s: &str| -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    };
    assert_eq!(
        record(&scalar_event("train/loss", 0.1, 3, 1.5e9 + 0.25)),
        hex("200000000000000029eda95009000010c00b5ad64110032a130a110a0a747261696e2f6c6f73731\
             5cdcccc3d6124851f")
    );
    assert_eq!(
        record(&scalar_event("x", -2.5, -7, 1.7e9)),
        hex("200000000000000029eda9500900000040fc54d94110f9ffffffffffffffff012a0a0a080a0178150\
             00020c016acb552")
    );
}

#[test]
fn records_round_trip_with_their_crcs() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = EventWriter::create(dir.path()).unwrap();
    let name = w.path().file_name().unwrap().to_string_lossy().into_owned();
    let parts: Vec<&str> = name.split('.').collect();
    assert_eq!(&parts[..3], ["events", "out", "tfevents"]);
    assert_eq!(parts[3].len(), 10, "{name}");
    assert_eq!(parts[parts.len() - 2], std::process::id().to_string());
    w.add_scalar("train/loss", 0.1, 0).unwrap();
    w.add_scalar_at("train/loss", f32::MIN_POSITIVE, 7, 1.5e9 + 0.25).unwrap();
    w.add_scalars(-3, &[("a", 1.0f32), ("b", f32::INFINITY)]).unwrap();
    w.add_scalar("big", -2.5, i64::MAX).unwrap();
    drop(w);
    let events = read_dir_events(dir.path());
    assert_eq!(events.len(), 6);
    assert_eq!(events[0].file_version.as_deref(), Some(FILE_VERSION));
    assert!(events[0].values.is_empty());
    let now = wall_time();
    assert!(events[0].wall_time > 1.6e9 && events[0].wall_time <= now);
    let got: Vec<(i64, Vec<(String, f32)>)> =
        events[1..].iter().map(|e| (e.step, e.values.clone())).collect();
    let v = |t: &str, x: f32| vec![(t.to_string(), x)];
    assert_eq!(
        got,
        [
            (0, v("train/loss", 0.1)),
            (7, v("train/loss", f32::MIN_POSITIVE)),
            (-3, v("a", 1.0)),
            (-3, v("b", f32::INFINITY)),
            (i64::MAX, v("big", -2.5)),
        ]
    );
    assert_eq!(events[2].wall_time, 1.5e9 + 0.25);
    assert_eq!(events[3].wall_time, events[4].wall_time);
}

#[test]
fn a_truncated_file_keeps_its_complete_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = EventWriter::create(dir.path()).unwrap();
    for step in 0..5 {
        w.add_scalar("loss", step as f32, step).unwrap();
    }
    let path = w.path().to_path_buf();
    drop(w);
    let bytes = std::fs::read(&path).unwrap();
    let (all, _) = read_records(&bytes);
    assert_eq!(all.len(), 6);
    let whole: usize = all[..4].iter().map(|r| r.len() + 16).sum();
    // Cut inside the length, the header CRC, the data and the data CRC of the fifth record.
    for cut in [whole + 3, whole + 10, whole + 14, whole + all[4].len() + 14] {
        let (kept, truncated) = read_records(&bytes[..cut]);
        assert!(truncated, "cut at {cut}");
        assert_eq!(kept, all[..4], "cut at {cut}");
    }
    // A flipped bit in the last record's data is caught by its CRC.
    let mut bad = bytes.clone();
    let last = bytes.len() - 6;
    bad[last] ^= 1;
    let (kept, truncated) = read_records(&bad);
    assert!(truncated);
    assert_eq!(kept.len(), 5);
}

#[test]
fn two_writers_in_one_directory_get_distinct_files() {
    let dir = tempfile::tempdir().unwrap();
    let a = EventWriter::create(dir.path()).unwrap();
    let b = EventWriter::create(&dir.path().join("nested/run")).unwrap();
    let c = EventWriter::create(dir.path()).unwrap();
    assert_ne!(a.path(), c.path());
    assert!(b.path().starts_with(dir.path().join("nested/run")));
}

#[test]
fn errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"x").unwrap();
    let err = EventWriter::create(&blocker.join("sub")).unwrap_err();
    assert!(matches!(err, EventWriterError::CreateDir { .. }));
    assert!(err.to_string().contains(&blocker.join("sub").display().to_string()), "{err}");
}
