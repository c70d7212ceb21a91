//! The bytes of an event file: protobuf wire format for `Event`s (varints, keys, length-delimited
//! fields), TFRecord framing and its masked CRC-32C.

/// The `Event` for one `Summary.Value{tag, simple_value}`.
pub(super) fn scalar_event(tag: &str, value: f32, step: i64, wall_time: f64) -> Vec<u8> {
    let mut val = Vec::new();
    put_bytes(&mut val, 1, tag.as_bytes());
    put_key(&mut val, 2, 5);
    val.extend(value.to_le_bytes());
    let mut summary = Vec::new();
    put_bytes(&mut summary, 1, &val);
    let mut body = Vec::new();
    put_bytes(&mut body, 5, &summary);
    event(wall_time, step, &body)
}

/// `wall_time` (field 1, fixed64 double), `step` (field 2, varint; omitted when 0 as proto3
/// does), then `body` (further fields, already encoded).
pub(super) fn event(wall_time: f64, step: i64, body: &[u8]) -> Vec<u8> {
    let mut e = Vec::with_capacity(body.len() + 20);
    put_key(&mut e, 1, 1);
    e.extend(wall_time.to_le_bytes());
    if step != 0 {
        put_key(&mut e, 2, 0);
        put_varint(&mut e, step as u64);
    }
    e.extend_from_slice(body);
    e
}

pub(super) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(super) fn put_key(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    put_varint(out, (u64::from(field) << 3) | u64::from(wire_type));
}

/// A length-delimited field (wire type 2): strings and embedded messages.
pub(super) fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// One TFRecord around `data`.
pub(super) fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut r = Vec::with_capacity(data.len() + 16);
    r.extend(len);
    r.extend(masked_crc32c(&len).to_le_bytes());
    r.extend_from_slice(data);
    r.extend(masked_crc32c(data).to_le_bytes());
    r
}

/// The CRC-32C (Castagnoli, reflected polynomial 0x82f63b78) lookup table.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x82f6_3b78 } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// CRC-32C of `data`.
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |c, &b| CRC32C_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8))
}

/// TFRecord's masked CRC (`crc32c::Mask`): rotated right by 15 plus a constant.
pub(crate) fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}
