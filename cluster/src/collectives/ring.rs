//! Ring collectives over [`RingSend`]/[`RingRecv`]: all-reduce (sum of `f32`), broadcast, barrier.
//!
//! # All-reduce: message schedule and reduction order
//!
//! The buffer (length `L`, equal on every rank) is cut into `k = max(1, ⌈L / chunk_floats⌉)`
//! balanced chunks (the first `L mod k` chunks hold one element more). Two pipelined phases follow,
//! each a chain of `n − 1` hops over the ring's next/prev links, as gloo's ring (a reduce phase, then
//! a gather phase), except that the reduce chain starts at rank 0 for every chunk instead of rotating:
//!
//! 1. **Reduce**: rank 0 sends its chunk `i`; rank `r` (`0 < r < n − 1`) receives the partial sum of
//!    chunk `i`, adds its own chunk (`acc[j] = partial[j] + x_r[j]`) and sends `acc` on; rank
//!    `n − 1` adds its own chunk last. Each element is thus
//!    `(((x₀ + x₁) + x₂) + …) + x_{n−1}`, evaluated left to right in `f32` — the same bits as the
//!    sequential fold `xs[1..].iter().fold(xs[0], |a, x| a + x)` (note: it starts from `x₀`, not from
//!    `0.0`, which only matters for `−0.0`).
//! 2. **Gather**: rank `n − 1` sends each finished chunk to rank 0, which passes it on
//!    (`n − 1 → 0 → 1 → … → n − 2`); every rank copies the received bits into its buffer.
//!
//! The order is fixed by the schedule, not by timing, and every rank ends with rank `n − 1`'s bits.
//! Cost per rank: about `2·L·4` bytes sent (a rotating ring sends `2·L·4·(n − 1)/n`); latency
//! `2·(n − 2 + k)` message hops. With the default chunk (256 Ki floats, 1 MiB) a few-kilobyte
//! gradient is a single chunk, i.e. `2·(n − 1)` hops like the ring.
//!
//! Each rank receives concurrently with its sends (a pump drains the previous rank into a local
//! queue), so bounded transports cannot deadlock. Every message carries a header (kind, operation
//! sequence number, buffer length, chunk index, element count) that the receiver checks, so ranks
//! that call collectives in different orders or with different lengths get a
//! [`CollectiveError::Protocol`] error instead of a wrong result.
//!
//! # Failure
//!
//! An error (link failure, protocol mismatch, timeout) drops both link halves, so the neighbours'
//! links close and they fail too instead of waiting; the [`Ring`] is then broken and every later
//! call returns [`CollectiveError::Broken`]. Rebuild the ring from the surviving members.

use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;

use super::{LinkError, RingRecv, RingSend};

/// Tuning of a [`Ring`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingConfig {
    /// Most `f32` elements in one message (pipelining granularity); at least 1. Default 256 Ki.
    pub chunk_floats: usize,
    /// Limit on one collective call; `None` waits forever (a frozen peer that keeps its links open
    /// would then hang the call). Default 300 s.
    pub timeout: Option<Duration>,
}

impl Default for RingConfig {
    fn default() -> Self {
        Self { chunk_floats: 256 * 1024, timeout: Some(Duration::from_secs(300)) }
    }
}

/// Errors of the collectives; each says what went wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CollectiveError {
    /// `rank` must be below `size`, and `size` at least 1.
    #[error("invalid ring position: rank {rank} of size {size}")]
    InvalidRank {
        /// The rank given.
        rank: usize,
        /// The ring size given.
        size: usize,
    },
    /// The broadcast root must be a rank of the ring.
    #[error("broadcast root {root} is not a rank of this ring of size {size}")]
    InvalidRoot {
        /// The root given.
        root: usize,
        /// The ring size.
        size: usize,
    },
    /// A link half failed during the call; the ring is now broken.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// A message did not match the schedule: ranks called different collectives, in a different
    /// order, or with different buffer lengths. The ring is now broken.
    #[error("collective protocol mismatch: {0}")]
    Protocol(String),
    /// The call did not finish within [`RingConfig::timeout`]; the ring is now broken.
    #[error("collective did not finish within {0:?}")]
    Timeout(Duration),
    /// An earlier call failed and dropped the links; rebuild the ring.
    #[error("the ring is broken by an earlier failure; rebuild it from the surviving members")]
    Broken,
}

/// Message kinds (first header byte).
const REDUCE: u8 = 1;
const GATHER: u8 = 2;
const BCAST: u8 = 3;
const ARRIVE: u8 = 4;
const RELEASE: u8 = 5;
/// A partial sum of [`Ring::reduce_parts`] (`PARTIAL_EMPTY`: no part summed yet, no floats).
const PARTIAL: u8 = 6;
const PARTIAL_EMPTY: u8 = 7;
/// kind u8, 3 zero bytes, seq u32, total u64, chunk u32, count u32 (all little-endian).
const HEADER: usize = 24;

/// One rank's position in a ring, with its two link halves.
#[derive(Debug)]
pub struct Ring<S, R> {
    rank: usize,
    size: usize,
    config: RingConfig,
    links: Option<(S, R)>,
    seq: u32,
}

impl<S: RingSend, R: RingRecv> Ring<S, R> {
    /// Rank `rank` of a ring of `size` ranks, sending to rank `rank + 1` and receiving from
    /// `rank − 1` (mod `size`). For `size == 1` the links are never used.
    pub fn new(
        rank: usize,
        size: usize,
        send: S,
        recv: R,
        config: RingConfig,
    ) -> Result<Self, CollectiveError> {
        if rank >= size {
            return Err(CollectiveError::InvalidRank { rank, size });
        }
        // Chunk lengths travel as u32.
        let chunk_floats = config.chunk_floats.clamp(1, u32::MAX as usize);
        let config = RingConfig { chunk_floats, ..config };
        Ok(Self { rank, size, config, links: Some((send, recv)), seq: 0 })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Whether an earlier failure broke the ring.
    pub fn is_broken(&self) -> bool {
        self.links.is_none()
    }

    /// Sums `buf` element-wise over all ranks, in rank order (see the module docs); every rank ends
    /// with identical bits. All ranks must pass buffers of the same length.
    pub async fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let (rank, n, seq, cf) = self.start()?;
        let (tx, rx) = self.links.as_mut().ok_or(CollectiveError::Broken)?;
        let res = run(self.config.timeout, all_reduce(tx, rx, rank, n, seq, cf, buf)).await;
        self.finish(res)
    }

    /// Sums every rank's `parts` element-wise into `out`, in one fixed order: rank 0's parts in
    /// their order, then rank 1's, and so on, each added to the running sum left to right in
    /// `f32` (`((p₀ + p₁) + p₂) + …`, starting from the first part, not from `0.0`). That is the
    /// sequential fold of all parts in rank-then-part order, so when the parts are the items of a
    /// list spread over the ranks in contiguous blocks, the result has the same bits for any
    /// number of ranks and any split, including ranks with no part. Every rank ends with the
    /// same bits in `out`; with no part on any rank, `out` is all zeros. Every part and `out`
    /// must have the same length, on every rank.
    ///
    /// The chain is the one of [`Ring::all_reduce_sum`]: rank 0 sends its partial sum of each
    /// chunk, each rank adds its parts to what it receives and passes it on, and the last rank
    /// sends the finished chunk round to the others.
    pub async fn reduce_parts(
        &mut self,
        parts: &[&[f32]],
        out: &mut [f32],
    ) -> Result<(), CollectiveError> {
        if let Some(p) = parts.iter().find(|p| p.len() != out.len()) {
            return Err(CollectiveError::Protocol(format!(
                "a part of {} floats for a sum of {} floats",
                p.len(),
                out.len()
            )));
        }
        let (rank, n, seq, cf) = self.start()?;
        let (tx, rx) = self.links.as_mut().ok_or(CollectiveError::Broken)?;
        let res =
            run(self.config.timeout, reduce_parts(tx, rx, rank, n, seq, cf, parts, out)).await;
        self.finish(res)
    }

    /// Copies `root`'s `buf` into every rank's `buf` (a pipelined chain from `root` around the
    /// ring). All ranks must pass buffers of the same length.
    pub async fn broadcast(&mut self, root: usize, buf: &mut [f32]) -> Result<(), CollectiveError> {
        if root >= self.size {
            return Err(CollectiveError::InvalidRoot { root, size: self.size });
        }
        let (rank, n, seq, cf) = self.start()?;
        let (tx, rx) = self.links.as_mut().ok_or(CollectiveError::Broken)?;
        let pos = (rank + n - root) % n;
        let res = run(self.config.timeout, broadcast(tx, rx, pos, n, seq, cf, buf)).await;
        self.finish(res)
    }

    /// Returns once every rank has entered the barrier: a token goes round the ring from rank 0
    /// (arrive), then a second one (release).
    pub async fn barrier(&mut self) -> Result<(), CollectiveError> {
        let (rank, n, seq, _) = self.start()?;
        let (tx, rx) = self.links.as_mut().ok_or(CollectiveError::Broken)?;
        let res = run(self.config.timeout, barrier(tx, rx, rank, n, seq)).await;
        self.finish(res)
    }

    fn start(&mut self) -> Result<(usize, usize, u32, usize), CollectiveError> {
        if self.links.is_none() {
            return Err(CollectiveError::Broken);
        }
        self.seq = self.seq.wrapping_add(1);
        Ok((self.rank, self.size, self.seq, self.config.chunk_floats))
    }

    fn finish(&mut self, res: Result<(), CollectiveError>) -> Result<(), CollectiveError> {
        if res.is_err() {
            // Dropping both halves closes the neighbours' links, so they fail instead of waiting.
            self.links = None;
        }
        res
    }
}

async fn run(
    timeout: Option<Duration>,
    fut: impl Future<Output = Result<(), CollectiveError>>,
) -> Result<(), CollectiveError> {
    match timeout {
        None => fut.await,
        Some(t) => tokio::time::timeout(t, fut).await.unwrap_or(Err(CollectiveError::Timeout(t))),
    }
}

/// Element range of chunk `i` of `k` balanced chunks of a buffer of length `len`.
fn chunk_range(len: usize, k: usize, i: usize) -> std::ops::Range<usize> {
    let (base, rem) = (len / k, len % k);
    let start = i * base + i.min(rem);
    start..start + base + usize::from(i < rem)
}

fn chunk_count(len: usize, chunk_floats: usize) -> usize {
    len.div_ceil(chunk_floats).max(1)
}

/// Header fields of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tag {
    kind: u8,
    seq: u32,
    total: u64,
    chunk: u32,
}

fn encode(tag: Tag, data: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + 4 * data.len());
    out.extend_from_slice(&[tag.kind, 0, 0, 0]);
    out.extend_from_slice(&tag.seq.to_le_bytes());
    out.extend_from_slice(&tag.total.to_le_bytes());
    out.extend_from_slice(&tag.chunk.to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    for x in data {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn field<const N: usize>(msg: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&msg[at..at + N]);
    a
}

/// Checks that `msg` is exactly the message `want` with `count` elements; returns its payload bytes.
fn check(msg: &[u8], want: Tag, count: usize) -> Result<&[u8], CollectiveError> {
    if msg.len() < HEADER {
        return Err(CollectiveError::Protocol(format!(
            "message of {} bytes has no header",
            msg.len()
        )));
    }
    let got = Tag {
        kind: msg[0],
        seq: u32::from_le_bytes(field(msg, 4)),
        total: u64::from_le_bytes(field(msg, 8)),
        chunk: u32::from_le_bytes(field(msg, 16)),
    };
    let got_count = u32::from_le_bytes(field(msg, 20)) as usize;
    if got != want || got_count != count || msg.len() != HEADER + 4 * count {
        return Err(CollectiveError::Protocol(format!(
            "expected {want:?} with {count} floats from the previous rank, got {got:?} with \
             {got_count} floats in {} bytes",
            msg.len()
        )));
    }
    Ok(&msg[HEADER..])
}

fn floats(payload: &[u8]) -> impl Iterator<Item = f32> + '_ {
    payload.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Reads `expected` messages from the previous rank into a local queue, so this rank never stops
/// draining its inbound link while it sends.
async fn pump<R: RingRecv>(
    rx: &mut R,
    expected: usize,
    queue: mpsc::UnboundedSender<Vec<u8>>,
) -> Result<(), CollectiveError> {
    for _ in 0..expected {
        let msg = rx.recv_prev().await?;
        // The consumer only stops early when it failed, and its error is the one reported.
        let _ = queue.send(msg);
    }
    Ok(())
}

async fn next(queue: &mut mpsc::UnboundedReceiver<Vec<u8>>) -> Result<Vec<u8>, CollectiveError> {
    queue.recv().await.ok_or_else(|| {
        CollectiveError::Protocol("the previous rank sent fewer messages than expected".into())
    })
}

async fn all_reduce<S: RingSend, R: RingRecv>(
    tx: &mut S,
    rx: &mut R,
    rank: usize,
    n: usize,
    seq: u32,
    chunk_floats: usize,
    buf: &mut [f32],
) -> Result<(), CollectiveError> {
    if n == 1 {
        return Ok(());
    }
    let (len, k) = (buf.len(), chunk_count(buf.len(), chunk_floats));
    let tag = |kind, i: usize| Tag { kind, seq, total: len as u64, chunk: i as u32 };
    let last = n - 1;
    // Rank 0 receives the gather; the last rank the reduce; the others both.
    let expected = if rank == 0 || rank == last { k } else { 2 * k };
    let (qtx, mut q) = mpsc::unbounded_channel();
    let work = async {
        if rank == 0 {
            for i in 0..k {
                tx.send_next(encode(tag(REDUCE, i), &buf[chunk_range(len, k, i)])).await?;
            }
        } else {
            let mut acc = Vec::new();
            for i in 0..k {
                let range = chunk_range(len, k, i);
                let msg = next(&mut q).await?;
                let partial = check(&msg, tag(REDUCE, i), range.len())?;
                acc.clear();
                acc.extend(floats(partial).zip(&buf[range.clone()]).map(|(p, x)| p + x));
                if rank == last {
                    buf[range].copy_from_slice(&acc);
                    tx.send_next(encode(tag(GATHER, i), &acc)).await?;
                } else {
                    tx.send_next(encode(tag(REDUCE, i), &acc)).await?;
                }
            }
        }
        if rank != last {
            gather(tx, &mut q, rank, n, |i| tag(GATHER, i), k, buf).await?;
        }
        Ok(())
    };
    tokio::try_join!(pump(rx, expected, qtx), work).map(|_| ())
}

/// The gather phase shared by the reductions: the last rank's finished chunks arrive from the
/// previous rank, are copied into `buf` and passed on (by every rank but the one before the last).
async fn gather<S: RingSend>(
    tx: &mut S,
    q: &mut mpsc::UnboundedReceiver<Vec<u8>>,
    rank: usize,
    n: usize,
    tag: impl Fn(usize) -> Tag,
    k: usize,
    buf: &mut [f32],
) -> Result<(), CollectiveError> {
    let len = buf.len();
    for i in 0..k {
        let range = chunk_range(len, k, i);
        let msg = next(q).await?;
        let done = check(&msg, tag(i), range.len())?;
        for (b, v) in buf[range].iter_mut().zip(floats(done)) {
            *b = v;
        }
        if rank + 2 != n {
            tx.send_next(msg).await?;
        }
    }
    Ok(())
}

/// The sum [`Ring::reduce_parts`] computes, on one rank alone: `((p₀ + p₁) + p₂) + …` left to
/// right in `f32`, starting from the first part; zeros of length `len` without any part.
pub fn sequential_sum(parts: &[&[f32]], len: usize) -> Vec<f32> {
    add_parts(None, parts, 0..len).unwrap_or_else(|| vec![0.0; len])
}

/// `acc` (the sum so far, `None` before any part) plus each of `parts`' chunk `range`, in order.
fn add_parts(
    mut acc: Option<Vec<f32>>,
    parts: &[&[f32]],
    range: std::ops::Range<usize>,
) -> Option<Vec<f32>> {
    for p in parts {
        let p = &p[range.clone()];
        match &mut acc {
            Some(a) => a.iter_mut().zip(p).for_each(|(a, x)| *a += x),
            None => acc = Some(p.to_vec()),
        }
    }
    acc
}

fn partial_message(tag: impl Fn(u8) -> Tag, acc: &Option<Vec<f32>>) -> Vec<u8> {
    match acc {
        Some(a) => encode(tag(PARTIAL), a),
        None => encode(tag(PARTIAL_EMPTY), &[]),
    }
}

#[allow(clippy::too_many_arguments)]
async fn reduce_parts<S: RingSend, R: RingRecv>(
    tx: &mut S,
    rx: &mut R,
    rank: usize,
    n: usize,
    seq: u32,
    chunk_floats: usize,
    parts: &[&[f32]],
    out: &mut [f32],
) -> Result<(), CollectiveError> {
    let len = out.len();
    if n == 1 {
        out.copy_from_slice(&sequential_sum(parts, len));
        return Ok(());
    }
    let k = chunk_count(len, chunk_floats);
    let tag = |kind, i: usize| Tag { kind, seq, total: len as u64, chunk: i as u32 };
    let last = n - 1;
    let expected = if rank == 0 || rank == last { k } else { 2 * k };
    let (qtx, mut q) = mpsc::unbounded_channel();
    let work = async {
        for i in 0..k {
            let range = chunk_range(len, k, i);
            let received = if rank == 0 {
                None
            } else {
                let msg = next(&mut q).await?;
                if msg.first() == Some(&PARTIAL_EMPTY) {
                    check(&msg, tag(PARTIAL_EMPTY, i), 0)?;
                    None
                } else {
                    Some(floats(check(&msg, tag(PARTIAL, i), range.len())?).collect())
                }
            };
            let acc = add_parts(received, parts, range.clone());
            if rank == last {
                match &acc {
                    Some(a) => out[range.clone()].copy_from_slice(a),
                    None => out[range.clone()].fill(0.0),
                }
                tx.send_next(encode(tag(GATHER, i), &out[range])).await?;
            } else {
                tx.send_next(partial_message(|kind| tag(kind, i), &acc)).await?;
            }
        }
        if rank != last {
            gather(tx, &mut q, rank, n, |i| tag(GATHER, i), k, out).await?;
        }
        Ok(())
    };
    tokio::try_join!(pump(rx, expected, qtx), work).map(|_| ())
}

/// `pos` is this rank's distance from the root along the ring.
async fn broadcast<S: RingSend, R: RingRecv>(
    tx: &mut S,
    rx: &mut R,
    pos: usize,
    n: usize,
    seq: u32,
    chunk_floats: usize,
    buf: &mut [f32],
) -> Result<(), CollectiveError> {
    if n == 1 {
        return Ok(());
    }
    let (len, k) = (buf.len(), chunk_count(buf.len(), chunk_floats));
    let tag = |i: usize| Tag { kind: BCAST, seq, total: len as u64, chunk: i as u32 };
    let (qtx, mut q) = mpsc::unbounded_channel();
    let work = async {
        for i in 0..k {
            let range = chunk_range(len, k, i);
            if pos == 0 {
                tx.send_next(encode(tag(i), &buf[range])).await?;
                continue;
            }
            let msg = next(&mut q).await?;
            let data = check(&msg, tag(i), range.len())?;
            for (b, v) in buf[range].iter_mut().zip(floats(data)) {
                *b = v;
            }
            if pos + 1 != n {
                tx.send_next(msg).await?;
            }
        }
        Ok(())
    };
    let expected = if pos == 0 { 0 } else { k };
    tokio::try_join!(pump(rx, expected, qtx), work).map(|_| ())
}

async fn barrier<S: RingSend, R: RingRecv>(
    tx: &mut S,
    rx: &mut R,
    rank: usize,
    n: usize,
    seq: u32,
) -> Result<(), CollectiveError> {
    if n == 1 {
        return Ok(());
    }
    let tag = |kind| Tag { kind, seq, total: 0, chunk: 0 };
    let (qtx, mut q) = mpsc::unbounded_channel();
    let work = async {
        if rank == 0 {
            tx.send_next(encode(tag(ARRIVE), &[])).await?;
            // The arrive token came back: every rank has entered.
            check(&next(&mut q).await?, tag(ARRIVE), 0)?;
            tx.send_next(encode(tag(RELEASE), &[])).await?;
        } else {
            check(&next(&mut q).await?, tag(ARRIVE), 0)?;
            tx.send_next(encode(tag(ARRIVE), &[])).await?;
            check(&next(&mut q).await?, tag(RELEASE), 0)?;
            if rank + 1 != n {
                tx.send_next(encode(tag(RELEASE), &[])).await?;
            }
        }
        Ok(())
    };
    let expected = if rank == 0 { 1 } else { 2 };
    tokio::try_join!(pump(rx, expected, qtx), work).map(|_| ())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use super::super::{memory_ring, MemoryRecv, MemorySend};
    use super::*;

    /// A send half that fails after `budget` messages (`None`: never).
    struct TestSend {
        inner: MemorySend,
        budget: Option<usize>,
    }

    impl RingSend for TestSend {
        async fn send_next(&mut self, bytes: Vec<u8>) -> Result<(), LinkError> {
            match &mut self.budget {
                Some(0) => Err(LinkError::Failed("injected failure".into())),
                Some(b) => {
                    *b -= 1;
                    self.inner.send_next(bytes).await
                }
                None => self.inner.send_next(bytes).await,
            }
        }
    }

    type TestRing = Ring<TestSend, MemoryRecv>;

    fn rings(n: usize, config: RingConfig, fail: Option<(usize, usize)>) -> Vec<TestRing> {
        memory_ring(n, 1)
            .into_iter()
            .enumerate()
            .map(|(r, (s, rx))| {
                let budget = fail.and_then(|(fr, b)| (fr == r).then_some(b));
                Ring::new(r, n, TestSend { inner: s, budget }, rx, config).expect("valid rank")
            })
            .collect()
    }

    fn config(chunk_floats: usize) -> RingConfig {
        RingConfig { chunk_floats, timeout: Some(Duration::from_secs(10)) }
    }

    use crate::test_rng::Rng;

    /// Runs `op` on every rank concurrently; returns each rank's result and buffer.
    async fn on_all<F, Fut>(
        rings: Vec<TestRing>,
        bufs: Vec<Vec<f32>>,
        op: F,
    ) -> Vec<(Result<(), CollectiveError>, Vec<f32>)>
    where
        F: Fn(TestRing, Vec<f32>) -> Fut,
        Fut: Future<Output = (Result<(), CollectiveError>, Vec<f32>)> + Send + 'static,
    {
        let handles: Vec<_> =
            rings.into_iter().zip(bufs).map(|(ring, buf)| tokio::spawn(op(ring, buf))).collect();
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.expect("rank task panicked"));
        }
        out
    }

    fn sequential(inputs: &[Vec<f32>]) -> Vec<f32> {
        let mut acc = inputs[0].clone();
        for x in &inputs[1..] {
            for (a, v) in acc.iter_mut().zip(x) {
                *a += v;
            }
        }
        acc
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    async fn check_all_reduce(seed: u64, lens: &[usize], chunk_floats: &[usize]) {
        let mut rng = Rng(seed);
        for n in 1..=5usize {
            for len in [0, 1, n - 1, n, n + 1].iter().chain(lens).copied() {
                for &cf in chunk_floats {
                    let inputs: Vec<Vec<f32>> =
                        (0..n).map(|_| (0..len).map(|_| rng.float()).collect()).collect();
                    let want = bits(&sequential(&inputs));
                    let out =
                        on_all(
                            rings(n, config(cf), None),
                            inputs,
                            |mut ring, mut buf| async move {
                                (ring.all_reduce_sum(&mut buf).await, buf)
                            },
                        )
                        .await;
                    for (r, (res, buf)) in out.iter().enumerate() {
                        assert_eq!(res, &Ok(()), "n={n} len={len} cf={cf} rank={r}");
                        assert_eq!(bits(buf), want, "n={n} len={len} cf={cf} rank={r}");
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn all_reduce_equals_rank_order_fold_bit_for_bit() {
        check_all_reduce(7, &[7, 100, 1000], &[1, 3, 64, 256 * 1024]).await;
    }

    /// Same on a multi-threaded runtime, where ranks truly run in parallel and message timing varies.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn all_reduce_is_bit_identical_under_parallel_timing() {
        for seed in 0..5 {
            check_all_reduce(100 + seed, &[37, 5000], &[1, 5, 1024]).await;
        }
    }

    /// `items` split over `n` ranks in contiguous blocks of the given sizes.
    fn blocks(items: &[Vec<f32>], sizes: &[usize]) -> Vec<Vec<Vec<f32>>> {
        let mut at = 0;
        sizes
            .iter()
            .map(|&k| {
                let block = items[at..at + k].to_vec();
                at += k;
                block
            })
            .collect()
    }

    /// Every split of a list of items over the ranks in contiguous blocks (ranks with none
    /// included) reduces to the sequential fold of the list, bit for bit, on every rank.
    #[tokio::test(flavor = "multi_thread", worker_threads = 3)]
    async fn reduce_parts_is_the_item_order_fold_for_any_split() {
        let mut rng = Rng(23);
        let len = 1000;
        let items: Vec<Vec<f32>> =
            (0..6).map(|_| (0..len).map(|_| rng.float() * 1e3).collect()).collect();
        let want = bits(&sequential(&items));
        let splits: &[&[usize]] = &[
            &[6],
            &[3, 3],
            &[0, 6],
            &[6, 0],
            &[2, 2, 2],
            &[0, 3, 3],
            &[1, 0, 5],
            &[4, 2, 0],
            &[1, 1, 1, 3],
            &[0, 0, 0, 6],
            &[2, 0, 0, 4, 0],
        ];
        for split in splits {
            for cf in [1, 7, 256] {
                let n = split.len();
                let per_rank = blocks(&items, split);
                let handles: Vec<_> = rings(n, config(cf), None)
                    .into_iter()
                    .zip(per_rank)
                    .map(|(mut ring, mine)| {
                        tokio::spawn(async move {
                            let parts: Vec<&[f32]> = mine.iter().map(Vec::as_slice).collect();
                            let mut out = vec![f32::NAN; len];
                            let res = ring.reduce_parts(&parts, &mut out).await;
                            (res, out)
                        })
                    })
                    .collect();
                for (r, h) in handles.into_iter().enumerate() {
                    let (res, out) = h.await.unwrap();
                    assert_eq!(res, Ok(()), "split {split:?} cf={cf} rank={r}");
                    assert_eq!(bits(&out), want, "split {split:?} cf={cf} rank={r}");
                }
            }
        }
    }

    /// No part anywhere gives zeros; a part of the wrong length is refused before any message.
    #[tokio::test]
    async fn reduce_parts_without_parts_is_zero_and_checks_lengths() {
        let handles: Vec<_> = rings(3, config(2), None)
            .into_iter()
            .map(|mut ring| {
                tokio::spawn(async move {
                    let mut out = vec![f32::NAN; 5];
                    let res = ring.reduce_parts(&[], &mut out).await;
                    (res, out)
                })
            })
            .collect();
        for h in handles {
            let (res, out) = h.await.unwrap();
            assert_eq!(res, Ok(()));
            assert_eq!(out, vec![0.0; 5]);
        }
        let mut ring = rings(1, config(2), None).pop().unwrap();
        let mut out = vec![0.0; 3];
        let err = ring.reduce_parts(&[&[1.0, 2.0]], &mut out).await.unwrap_err();
        assert!(err.to_string().contains("2 floats for a sum of 3"), "{err}");
    }

    /// The inputs above are order-sensitive: the reverse-order sum gives other bits, so the equality
    /// test would catch a reduction in another order.
    #[test]
    fn test_inputs_are_order_sensitive() {
        let mut rng = Rng(7);
        let inputs: Vec<Vec<f32>> =
            (0..5).map(|_| (0..1000).map(|_| rng.float()).collect()).collect();
        let mut reversed = inputs.clone();
        reversed.reverse();
        assert_ne!(bits(&sequential(&inputs)), bits(&sequential(&reversed)));
    }

    #[tokio::test]
    async fn broadcast_copies_the_root_buffer_everywhere() {
        let mut rng = Rng(11);
        for n in 1..=5usize {
            for root in 0..n {
                for (len, cf) in [(0, 4), (1, 4), (3, 1), (50, 7)] {
                    let inputs: Vec<Vec<f32>> =
                        (0..n).map(|_| (0..len).map(|_| rng.float()).collect()).collect();
                    let want = bits(&inputs[root]);
                    let out = on_all(
                        rings(n, config(cf), None),
                        inputs,
                        move |mut ring, mut buf| async move {
                            (ring.broadcast(root, &mut buf).await, buf)
                        },
                    )
                    .await;
                    for (r, (res, buf)) in out.iter().enumerate() {
                        assert_eq!(res, &Ok(()), "n={n} root={root} rank={r}");
                        assert_eq!(bits(buf), want, "n={n} root={root} rank={r}");
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn barrier_returns_only_after_every_rank_entered() {
        for n in 1..=5usize {
            let entered = Arc::new(AtomicUsize::new(0));
            let out = on_all(rings(n, config(4), None), vec![vec![]; n], |mut ring, buf| {
                let entered = entered.clone();
                async move {
                    let mut res = Ok(());
                    for round in 1..=3 {
                        // Later ranks arrive later.
                        tokio::time::sleep(Duration::from_millis(5 * ring.rank() as u64)).await;
                        entered.fetch_add(1, Ordering::SeqCst);
                        res = ring.barrier().await;
                        let seen = entered.load(Ordering::SeqCst);
                        assert!(
                            seen >= round * ring.size(),
                            "left round {round} after {seen} entries"
                        );
                        if res.is_err() {
                            break;
                        }
                    }
                    (res, buf)
                }
            })
            .await;
            assert!(out.iter().all(|(res, _)| res.is_ok()), "n={n}: {out:?}");
        }
    }

    /// Mixed collectives back to back stay in step (sequence numbers match on every rank).
    #[tokio::test]
    async fn mixed_collectives_back_to_back() {
        let n = 4;
        let out = on_all(
            rings(n, config(2), None),
            vec![vec![0.0; 9]; n],
            |mut ring, mut buf| async move {
                for step in 0..5 {
                    for (j, b) in buf.iter_mut().enumerate() {
                        *b = (ring.rank() * 100 + j + step) as f32;
                    }
                    if let Err(e) = ring.all_reduce_sum(&mut buf).await {
                        return (Err(e), buf);
                    }
                    if let Err(e) = ring.barrier().await {
                        return (Err(e), buf);
                    }
                    if let Err(e) = ring.broadcast(step % n, &mut buf).await {
                        return (Err(e), buf);
                    }
                }
                (Ok(()), buf)
            },
        )
        .await;
        let want: Vec<f32> = (0..9).map(|j| (600 + 4 * (j + 4)) as f32).collect();
        for (res, buf) in out {
            assert_eq!(res, Ok(()));
            assert_eq!(buf, want);
        }
    }

    /// A link that fails mid-operation makes every rank return an error (not hang), and the rings
    /// are broken afterwards.
    #[tokio::test]
    async fn failing_link_errors_on_every_rank() {
        for n in 2..=5 {
            for fail_rank in 0..n {
                for budget in [0, 1, 3] {
                    let inputs = vec![vec![1.0f32; 20]; n];
                    // Rings are kept alive until the end, so only the error path closes links.
                    let keep = Arc::new(Mutex::new(Vec::new()));
                    let all = on_all(
                        rings(n, config(2), Some((fail_rank, budget))),
                        inputs,
                        |mut ring, mut buf| {
                            let keep = keep.clone();
                            async move {
                                let res = ring.all_reduce_sum(&mut buf).await;
                                if res.is_err() {
                                    assert!(ring.is_broken());
                                    assert_eq!(ring.barrier().await, Err(CollectiveError::Broken));
                                }
                                keep.lock().expect("not poisoned").push(ring);
                                (res, buf)
                            }
                        },
                    );
                    let out = tokio::time::timeout(Duration::from_secs(5), all)
                        .await
                        .expect("no rank may hang on a failed link");
                    let failed = out.iter().filter(|(res, _)| res.is_err()).count();
                    assert!(
                        matches!(
                            out[fail_rank].0,
                            Err(CollectiveError::Link(LinkError::Failed(_)))
                        ),
                        "n={n} fail_rank={fail_rank} budget={budget}: {:?}",
                        out[fail_rank].0
                    );
                    // Every rank still waiting on a message must fail; with 10 chunks no rank can
                    // have finished before the failing rank's 4th message.
                    assert_eq!(failed, n, "n={n} fail_rank={fail_rank} budget={budget}");
                }
            }
        }
    }

    #[tokio::test]
    async fn different_lengths_are_a_protocol_error() {
        let n = 3;
        let bufs = vec![vec![1.0; 6], vec![1.0; 9], vec![1.0; 6]];
        let keep = Arc::new(Mutex::new(Vec::new()));
        let all = on_all(rings(n, config(3), None), bufs, |mut ring, mut buf| {
            let keep = keep.clone();
            async move {
                let res = ring.all_reduce_sum(&mut buf).await;
                keep.lock().expect("not poisoned").push(ring);
                (res, buf)
            }
        });
        let out = tokio::time::timeout(Duration::from_secs(5), all).await.expect("no hang");
        assert!(out.iter().all(|(res, _)| res.is_err()), "{out:?}");
        assert!(out.iter().any(|(res, _)| matches!(res, Err(CollectiveError::Protocol(_)))));
    }

    #[tokio::test]
    async fn silent_peer_times_out() {
        let mut links = memory_ring(2, 1).into_iter();
        let (s0, r0) = links.next().expect("rank 0 links");
        let _rank1_links_kept_open = links.next();
        let cfg = RingConfig { chunk_floats: 4, timeout: Some(Duration::from_millis(50)) };
        let mut ring = Ring::new(0, 2, s0, r0, cfg).expect("valid");
        let mut buf = vec![1.0; 3];
        assert_eq!(
            ring.all_reduce_sum(&mut buf).await,
            Err(CollectiveError::Timeout(Duration::from_millis(50)))
        );
        assert!(ring.is_broken());
    }

    #[tokio::test]
    async fn invalid_rank_and_root_are_rejected() {
        let (s, r) = memory_ring(1, 1).pop().expect("one rank");
        assert!(matches!(
            Ring::new(1, 1, s, r, RingConfig::default()),
            Err(CollectiveError::InvalidRank { rank: 1, size: 1 })
        ));
        let (s, r) = memory_ring(1, 1).pop().expect("one rank");
        let mut ring: Ring<MemorySend, MemoryRecv> =
            Ring::new(0, 1, s, r, RingConfig::default()).expect("valid");
        let mut buf = vec![2.5];
        assert_eq!(
            ring.broadcast(1, &mut buf).await,
            Err(CollectiveError::InvalidRoot { root: 1, size: 1 })
        );
        assert_eq!(ring.all_reduce_sum(&mut buf).await, Ok(()));
        assert_eq!(ring.barrier().await, Ok(()));
        assert_eq!(buf, vec![2.5]);
    }

    #[test]
    fn chunks_cover_the_buffer_in_order() {
        for len in 0..40 {
            for cf in 1..9 {
                let k = chunk_count(len, cf);
                let mut next = 0;
                for i in 0..k {
                    let r = chunk_range(len, k, i);
                    assert_eq!(r.start, next);
                    assert!(r.len() <= cf);
                    next = r.end;
                }
                assert_eq!(next, len);
            }
        }
    }
}
