//! Pickling: what CPython's pickle protocol 2 writes for a [`SaveValue`], memo included, with
//! tensors as `torch._utils._rebuild_tensor_v2` of one storage each, as `torch.save` does.

use super::{Dtype, SaveValue, TensorRef};
use std::borrow::Cow;
use std::collections::HashMap;

pub(super) struct Pickler<'v, 'a> {
    pub(super) out: Vec<u8>,
    memo_len: u32,
    /// Memo slots of globals and of the constant strings torch's `persistent_id` reuses.
    shared: HashMap<&'static str, u32>,
    /// The tensors in storage-key order.
    pub(super) storages: Vec<&'v TensorRef<'a>>,
}

impl<'v, 'a> Pickler<'v, 'a> {
    pub(super) fn new() -> Self {
        Self { out: vec![0x80, 2], memo_len: 0, shared: HashMap::new(), storages: Vec::new() }
    }

    fn memoize(&mut self) -> u32 {
        let i = self.memo_len;
        if i < 256 {
            self.out.extend_from_slice(&[b'q', i as u8]);
        } else {
            self.out.push(b'r');
            self.out.extend_from_slice(&i.to_le_bytes());
        }
        self.memo_len += 1;
        i
    }

    /// A global or a constant string, written once and then fetched from the memo.
    fn shared(&mut self, key: &'static str, write: impl FnOnce(&mut Vec<u8>)) {
        match self.shared.get(key) {
            Some(&i) if i < 256 => self.out.extend_from_slice(&[b'h', i as u8]),
            Some(&i) => {
                self.out.push(b'j');
                self.out.extend_from_slice(&i.to_le_bytes());
            }
            None => {
                write(&mut self.out);
                let i = self.memoize();
                self.shared.insert(key, i);
            }
        }
    }

    fn global(&mut self, key: &'static str) {
        // key is "module\nname\n".
        self.shared(key, |out| {
            out.push(b'c');
            out.extend_from_slice(key.as_bytes());
        });
    }

    fn str(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
        self.memoize();
    }

    fn const_str(&mut self, s: &'static str) {
        self.shared(s, |out| {
            out.push(b'X');
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        });
    }

    fn int(&mut self, v: i64) {
        if (0..=0xff).contains(&v) {
            self.out.extend_from_slice(&[b'K', v as u8]);
        } else if (0..=0xffff).contains(&v) {
            self.out.push(b'M');
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else if (i32::MIN as i64..=i32::MAX as i64).contains(&v) {
            self.out.push(b'J');
            self.out.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            // LONG1: the shortest little-endian two's complement (CPython's `encode_long`).
            let bytes = v.to_le_bytes();
            let mut n = 8;
            while n > 1 {
                let (top, next) = (bytes[n - 1], bytes[n - 2]);
                if (top == 0 && next & 0x80 == 0) || (top == 0xff && next & 0x80 != 0) {
                    n -= 1;
                } else {
                    break;
                }
            }
            self.out.extend_from_slice(&[0x8a, n as u8]);
            self.out.extend_from_slice(&bytes[..n]);
        }
    }

    /// A tuple of already-written items: TUPLE1-3, or MARK … TUPLE; EMPTY_TUPLE is not memoized.
    fn tuple(&mut self, items: impl FnOnce(&mut Self), n: usize) {
        if n == 0 {
            self.out.push(b')');
            return;
        }
        if n > 3 {
            self.out.push(b'(');
        }
        items(self);
        self.out.push(match n {
            1 => 0x85,
            2 => 0x86,
            3 => 0x87,
            _ => b't',
        });
        self.memoize();
    }

    fn ints_tuple(&mut self, v: &[u64]) {
        self.tuple(
            |p| {
                for &x in v {
                    p.int(x as i64);
                }
            },
            v.len(),
        );
    }

    /// An empty `collections.OrderedDict()`: GLOBAL, EMPTY_TUPLE, REDUCE.
    fn ordered_dict_head(&mut self) {
        self.global("collections\nOrderedDict\n");
        self.out.extend_from_slice(b")R");
        self.memoize();
    }

    /// `_batch_setitems`: SETITEM for one, MARK … SETITEMS per batch of up to 1000.
    fn items(&mut self, items: &'v [(Cow<'a, str>, SaveValue<'a>)]) {
        for batch in items.chunks(1000) {
            if batch.len() > 1 {
                self.out.push(b'(');
            }
            for (k, v) in batch {
                self.str(k);
                self.value(v);
            }
            self.out.push(if batch.len() > 1 { b'u' } else { b's' });
        }
    }

    pub(super) fn value(&mut self, v: &'v SaveValue<'a>) {
        match v {
            SaveValue::Tensor(t) => self.tensor(t),
            SaveValue::Dict(items) => {
                self.out.push(b'}');
                self.memoize();
                self.items(items);
            }
            SaveValue::OrderedDict(items) => {
                self.ordered_dict_head();
                self.items(items);
            }
            SaveValue::List(items) => {
                self.out.push(b']');
                self.memoize();
                for batch in items.chunks(1000) {
                    if batch.len() > 1 {
                        self.out.push(b'(');
                    }
                    for x in batch {
                        self.value(x);
                    }
                    self.out.push(if batch.len() > 1 { b'e' } else { b'a' });
                }
            }
            SaveValue::Tuple(items) => self.tuple(
                |p| {
                    for x in items {
                        p.value(x);
                    }
                },
                items.len(),
            ),
            SaveValue::Int(i) => self.int(*i),
            SaveValue::Float(x) => {
                self.out.push(b'G');
                self.out.extend_from_slice(&x.to_be_bytes());
            }
            SaveValue::Str(s) => self.str(s),
            SaveValue::Bool(b) => self.out.push(if *b { 0x88 } else { 0x89 }),
            SaveValue::None => self.out.push(b'N'),
        }
    }

    /// `_rebuild_tensor_v2(('storage', torch.FloatStorage, key, 'cpu', numel), 0, size, stride,
    /// False, OrderedDict())`, with one storage per tensor.
    fn tensor(&mut self, t: &'v TensorRef<'a>) {
        let key = self.storages.len().to_string();
        self.storages.push(t);
        let size: Vec<u64> = t.shape.iter().map(|&d| d as u64).collect();
        let mut stride = vec![0u64; size.len()];
        let mut acc = 1u64;
        for (s, &d) in stride.iter_mut().zip(&size).rev() {
            *s = acc;
            acc *= d.max(1);
        }
        let numel: u64 = size.iter().product();
        self.global("torch._utils\n_rebuild_tensor_v2\n");
        self.tuple(
            |p| {
                p.tuple(
                    |p| {
                        p.const_str("storage");
                        p.global(storage_global(t.dtype));
                        p.str(&key);
                        p.const_str("cpu");
                        p.int(numel as i64);
                    },
                    5,
                );
                p.out.push(b'Q');
                p.int(0);
                p.ints_tuple(&size);
                p.ints_tuple(&stride);
                p.out.push(0x89);
                p.ordered_dict_head();
            },
            6,
        );
        self.out.push(b'R');
        self.memoize();
    }
}

fn storage_global(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => "torch\nFloatStorage\n",
        Dtype::F64 => "torch\nDoubleStorage\n",
        Dtype::F16 => "torch\nHalfStorage\n",
        Dtype::BF16 => "torch\nBFloat16Storage\n",
        Dtype::I64 => "torch\nLongStorage\n",
        Dtype::I32 => "torch\nIntStorage\n",
        Dtype::I16 => "torch\nShortStorage\n",
        Dtype::I8 => "torch\nCharStorage\n",
        Dtype::U8 => "torch\nByteStorage\n",
        Dtype::Bool => "torch\nBoolStorage\n",
    }
}
