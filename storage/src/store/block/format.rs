//! The block store's on-disk format, byte by byte (docs/storage-format.md
//! describes it for people). Every integer is little-endian. Everything
//! read back from a device is checked before it is believed.

use kiln_proto::{Digest, DigestFunction, Error, Result};

use crate::store::{AcKey, CasKey};

/// Bytes of a device or index file header, and of an index page.
pub const PAGE_BYTES: u64 = 4096;
/// Bytes of a record's header.
pub const RECORD_HEADER_BYTES: u64 = 64;
/// Each record's data is checksummed in chunks of this size (CRC32C).
pub const CRC_CHUNK_BYTES: u64 = 64 << 10;
/// Bytes of one index slot.
pub const SLOT_BYTES: u64 = 32;
/// Slots per index page.
pub const SLOTS_PER_PAGE: u64 = PAGE_BYTES / SLOT_BYTES;
/// The largest blob a slot can describe (40 bits of size).
pub const SLOT_SIZE_BYTES_MAX: u64 = (1 << 40) - 1;

const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"KLNR");
const DATA_MAGIC: &[u8; 8] = b"KILNDAT\0";
const INDEX_MAGIC: &[u8; 8] = b"KILNIDX\0";
const VERSION: u32 = 1;

/// Which store a file, record or key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Cas = 1,
    Ac = 2,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Cas),
            2 => Some(Kind::Ac),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Cas => "CAS",
            Kind::Ac => "action cache",
        }
    }
}

fn crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// 128 bits naming a key: its store, scope, digest function, hash and size.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 16]);

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", hex_prefix(&self.0))
    }
}

fn hex_prefix(b: &[u8]) -> String {
    b.iter().take(8).map(|x| format!("{x:02x}")).collect()
}

impl Fingerprint {
    fn of(kind: Kind, scope: &str, digest: &Digest) -> Fingerprint {
        let mut h = blake3::Hasher::new();
        h.update(&[kind as u8]);
        h.update(&(scope.len() as u64).to_le_bytes());
        h.update(scope.as_bytes());
        h.update(&[match digest.function() {
            DigestFunction::Sha256 => 1,
            DigestFunction::Blake3 => 9,
        }]);
        h.update(digest.hash());
        h.update(&digest.size_bytes().to_le_bytes());
        let mut fp = [0u8; 16];
        fp.copy_from_slice(&h.finalize().as_bytes()[..16]);
        // All zeros marks an empty slot.
        if fp == [0; 16] {
            fp[0] = 1;
        }
        Fingerprint(fp)
    }

    /// A CAS key's fingerprint in a store of [`FINGERPRINTS_BLAKE3`]
    /// (stores name keys with [`Fingerprinter`]).
    pub fn cas(key: &CasKey) -> Fingerprint {
        Self::of(Kind::Cas, key.scope.as_str(), &key.digest)
    }

    pub fn ac(key: &AcKey) -> Fingerprint {
        Self::of(Kind::Ac, key.instance.as_str(), &key.action)
    }

    /// Bits to choose a shard and a bucket with.
    pub fn bits(&self) -> u64 {
        u64_at(&self.0, 0)
    }
}

/// How a store names its CAS keys (the data header's byte 13, the
/// superblock's byte 14): every key hashed whole with BLAKE3 (stores
/// formatted before 2026-12-07), or the keyed scheme of [`Fingerprinter`].
/// Action cache keys are always hashed with BLAKE3.
pub const FINGERPRINTS_BLAKE3: u8 = 0;
pub const FINGERPRINTS_KEYED: u8 = 1;

/// Names keys for one store. In the keyed scheme a CAS key's fingerprint
/// is `AES-128_k(hash[0..16]) ^ hash[16..32] ^ T_k(scope, function)`,
/// with `k` and `T_k` derived from the store's id (which never leaves its
/// files): one block cipher call per key instead of a hash, and `T_k` once
/// per request. Without `k`, nobody can make two keys share a
/// fingerprint: for one scope and function, equal fingerprints of
/// different hashes need `AES_k(a) ^ AES_k(b)`; across scopes, `T_k(s) ^
/// T_k(s')`. The size is not in the fingerprint: a slot records the
/// blob's size, and a lookup checks it, so keys differing only in size
/// never match.
#[derive(Clone)]
pub struct Fingerprinter {
    scheme: u8,
    cipher: aes::Aes128,
    scope_key: [u8; 32],
}

impl std::fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fingerprinter").field("scheme", &self.scheme).finish_non_exhaustive()
    }
}

impl Fingerprinter {
    pub fn new(scheme: u8, store_id: &[u8; 16]) -> Fingerprinter {
        use aes::cipher::KeyInit;
        let key = blake3::derive_key("kiln block store 2026-12-07 CAS fingerprint cipher", store_id);
        let scope_key = blake3::derive_key("kiln block store 2026-12-07 CAS fingerprint scope", store_id);
        let cipher =
            aes::Aes128::new(&aes::cipher::generic_array::GenericArray::clone_from_slice(&key[..16]));
        Fingerprinter { scheme, cipher, scope_key }
    }

    pub fn scheme(&self) -> u8 {
        self.scheme
    }

    /// `T_k` of a scope and digest function.
    fn tweak(&self, scope: &str, function: DigestFunction) -> [u8; 16] {
        let mut h = blake3::Hasher::new_keyed(&self.scope_key);
        h.update(&(scope.len() as u64).to_le_bytes());
        h.update(scope.as_bytes());
        h.update(&[function as u8]);
        let mut t = [0u8; 16];
        t.copy_from_slice(&h.finalize().as_bytes()[..16]);
        t
    }

    pub fn cas(&self, key: &CasKey) -> Fingerprint {
        use aes::cipher::BlockEncrypt;
        if self.scheme == FINGERPRINTS_BLAKE3 {
            return Fingerprint::cas(key);
        }
        let mut block = first_half(key);
        self.cipher.encrypt_block(&mut block);
        Self::combine(key, &block, &self.tweak(key.scope.as_str(), key.digest.function()))
    }

    /// The fingerprints of `keys`, in order: the cipher runs over all of
    /// them at once, the tweak once per run of keys of one scope and
    /// function.
    pub fn cas_many(&self, keys: &[CasKey]) -> Vec<Fingerprint> {
        use aes::cipher::BlockEncrypt;
        if self.scheme == FINGERPRINTS_BLAKE3 {
            return keys.iter().map(Fingerprint::cas).collect();
        }
        let mut blocks: Vec<aes::Block> = keys.iter().map(first_half).collect();
        self.cipher.encrypt_blocks(&mut blocks);
        let mut tweak: Option<(&str, DigestFunction, [u8; 16])> = None;
        keys.iter()
            .zip(blocks)
            .map(|(k, block)| {
                let function = k.digest.function();
                let t = match tweak {
                    Some((scope, f, t)) if scope == k.scope.as_str() && f == function => t,
                    _ => {
                        let t = self.tweak(k.scope.as_str(), function);
                        tweak = Some((k.scope.as_str(), function, t));
                        t
                    }
                };
                Self::combine(k, &block, &t)
            })
            .collect()
    }

    /// `block ^ hash[16..32] ^ tweak`, never all zeros (an empty slot).
    fn combine(key: &CasKey, block: &aes::Block, tweak: &[u8; 16]) -> Fingerprint {
        let hash = key.digest.hash();
        let mut fp = [0u8; 16];
        for i in 0..16 {
            fp[i] = block[i] ^ hash[16 + i] ^ tweak[i];
        }
        if fp == [0; 16] {
            fp[0] = 1;
        }
        Fingerprint(fp)
    }

    pub fn ac(&self, key: &AcKey) -> Fingerprint {
        Fingerprint::ac(key)
    }
}

/// The first 16 bytes of a key's hash, as a cipher block (copied as an
/// array: a slice copy goes through an iterator per byte).
fn first_half(key: &CasKey) -> aes::Block {
    let mut half = [0u8; 16];
    half.copy_from_slice(&key.digest.hash()[..16]);
    aes::Block::from(half)
}

/// How many CRC chunks a blob of `size` bytes has.
pub fn crc_chunks(size: u64) -> u64 {
    size.div_ceil(CRC_CHUNK_BYTES)
}

/// Bytes a record of a `size`-byte blob takes: header, data, the chunk
/// checksums, padded to 8.
pub fn record_len(size: u64) -> u64 {
    (RECORD_HEADER_BYTES + size + 4 * crc_chunks(size)).next_multiple_of(8)
}

/// Where chunk `chunk`'s checksum lies within a record of a `size`-byte blob.
pub fn crc_offset(size: u64, chunk: u64) -> u64 {
    RECORD_HEADER_BYTES + size + 4 * chunk
}

/// The checksum of one chunk of data.
pub fn chunk_crc(data: &[u8]) -> u32 {
    crc(data)
}

/// Continues a chunk's checksum with more of its bytes.
pub fn chunk_crc_append(crc_so_far: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc_so_far, data)
}

/// The key a store's record headers are tagged with: derived from the
/// store id, which never leaves the store's own files. A rebuild that scans
/// the ring believes only headers whose tag checks out, so bytes a client
/// uploaded (and never committed) cannot pass for a record.
pub type RecordKey = [u8; 32];

pub fn record_key(store_id: &[u8; 16]) -> RecordKey {
    blake3::derive_key("kiln block store record header tag v1", store_id)
}

/// The header in front of every record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: Kind,
    pub fingerprint: Fingerprint,
    pub size: u64,
    /// Where in the ring the record was written; a record found elsewhere
    /// (a stale index entry after the ring wrapped) is not it.
    pub logical: u64,
}

impl RecordHeader {
    pub fn encode(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        b[4] = 1;
        b[5] = self.kind as u8;
        b[8..24].copy_from_slice(&self.fingerprint.0);
        b[24..32].copy_from_slice(&self.size.to_le_bytes());
        b[32..40].copy_from_slice(&self.logical.to_le_bytes());
        b[40..44].copy_from_slice(&u32::try_from(CRC_CHUNK_BYTES).unwrap_or(u32::MAX).to_le_bytes());
        let sum = crc(&b[..60]);
        b[60..64].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// The header with its tag (bytes 44..52: a keyed BLAKE3 of bytes
    /// 0..44 under the store's [`RecordKey`]), checksummed.
    pub fn encode_tagged(&self, key: &RecordKey) -> [u8; 64] {
        let mut b = self.encode();
        let tag = blake3::keyed_hash(key, &b[..44]);
        b[44..52].copy_from_slice(&tag.as_bytes()[..8]);
        let sum = crc(&b[..60]);
        b[60..64].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// The header in `b` if it is whole, of this version and tagged under
    /// `key` (what a scan of the ring believes).
    pub fn parse_tagged(b: &[u8], key: &RecordKey) -> Option<RecordHeader> {
        if b.len() < 64 || u32_at(b, 60) != crc(&b[..60]) || !Self::this_version(b) {
            return None;
        }
        let tag = blake3::keyed_hash(key, &b[..44]);
        if b[44..52] != tag.as_bytes()[..8] {
            return None;
        }
        Self::fields(b)
    }

    /// Whether the (checksummed) header `b` is one this version writes.
    fn this_version(b: &[u8]) -> bool {
        u32_at(b, 0) == RECORD_MAGIC && b[4] == 1 && u64::from(u32_at(b, 40)) == CRC_CHUNK_BYTES
    }

    /// The fields of the (checksummed) header `b`; `None` if it names no store.
    fn fields(b: &[u8]) -> Option<RecordHeader> {
        Some(RecordHeader {
            kind: Kind::from_byte(b[5])?,
            fingerprint: Fingerprint(b[8..24].try_into().ok()?),
            size: u64_at(b, 24),
            logical: u64_at(b, 32),
        })
    }

    /// Checks that `b` is the header `expected` describes.
    pub fn check(b: &[u8], expected: &RecordHeader) -> std::result::Result<(), String> {
        if b.len() < 64 || u32_at(b, 60) != crc(&b[..60]) {
            return Err("the record header's checksum does not match".into());
        }
        let found = Self::fields(b).ok_or("the record header names no store")?;
        if !Self::this_version(b) {
            return Err("the record header is not one this version writes".into());
        }
        if found != *expected {
            return Err(format!("the record there is another one ({found:?}, expected {expected:?})"));
        }
        Ok(())
    }
}

/// One index entry: a key's fingerprint and where its record lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Slot {
    pub fingerprint: [u8; 16],
    /// Logical offset of the record in the ring.
    pub logical: u64,
    /// The blob's size in bytes.
    pub size: u64,
}

impl Slot {
    pub fn is_empty(&self) -> bool {
        self.fingerprint == [0; 16]
    }

    fn check_bits(&self, seed: u64) -> u32 {
        let mut b = [0u8; 40];
        b[..8].copy_from_slice(&seed.to_le_bytes());
        b[8..24].copy_from_slice(&self.fingerprint);
        b[24..32].copy_from_slice(&self.logical.to_le_bytes());
        b[32..40].copy_from_slice(&self.size.to_le_bytes());
        crc(&b) & 0x00ff_ffff
    }

    /// The 32 bytes of this slot; empty slots are zeros.
    pub fn encode(&self, seed: u64, out: &mut [u8]) {
        if self.is_empty() {
            out[..32].fill(0);
            return;
        }
        out[0..16].copy_from_slice(&self.fingerprint);
        out[16..24].copy_from_slice(&self.logical.to_le_bytes());
        let meta = (self.size & SLOT_SIZE_BYTES_MAX) | (u64::from(self.check_bits(seed)) << 40);
        out[24..32].copy_from_slice(&meta.to_le_bytes());
    }

    /// The slot in `b`; empty (zeros) or with a wrong checksum: `None`.
    pub fn decode(b: &[u8], seed: u64) -> Option<Slot> {
        let mut fingerprint = [0u8; 16];
        fingerprint.copy_from_slice(&b[0..16]);
        let meta = u64_at(b, 24);
        let slot = Slot { fingerprint, logical: u64_at(b, 16), size: meta & SLOT_SIZE_BYTES_MAX };
        if slot.is_empty() {
            return None;
        }
        (u32::try_from(meta >> 40).ok() == Some(slot.check_bits(seed))).then_some(slot)
    }
}

/// The header at the start of a data device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHeader {
    pub kind: Kind,
    /// How the store names CAS keys: [`FINGERPRINTS_KEYED`], or
    /// [`FINGERPRINTS_BLAKE3`] in stores formatted before it.
    pub fingerprints: u8,
    pub store_id: [u8; 16],
    /// Bytes of the ring (the device less this header page).
    pub capacity: u64,
    pub block_bytes: u64,
}

impl DataHeader {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; usize::try_from(PAGE_BYTES).unwrap_or(4096)];
        b[0..8].copy_from_slice(DATA_MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12] = self.kind as u8;
        b[13] = self.fingerprints;
        b[16..32].copy_from_slice(&self.store_id);
        b[32..40].copy_from_slice(&self.capacity.to_le_bytes());
        b[40..48].copy_from_slice(&self.block_bytes.to_le_bytes());
        let sum = crc(&b[..60]);
        b[60..64].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// `Ok(None)` when the page holds no Kiln header at all (a new device).
    pub fn decode(b: &[u8]) -> Result<Option<DataHeader>> {
        if &b[0..8] != DATA_MAGIC {
            return Ok(None);
        }
        if u32_at(b, 60) != crc(&b[..60]) {
            return Err(Error::new(kiln_proto::Code::DataLoss, "the data header's checksum does not match"));
        }
        if u32_at(b, 8) != VERSION {
            return Err(Error::internal(format!("data format version {} is not {VERSION}", u32_at(b, 8))));
        }
        let kind = Kind::from_byte(b[12]).ok_or_else(|| Error::internal("the data header names no store"))?;
        let mut store_id = [0u8; 16];
        store_id.copy_from_slice(&b[16..32]);
        if b[13] > FINGERPRINTS_KEYED {
            return Err(Error::internal(format!("the data header names fingerprints of kind {}", b[13])));
        }
        Ok(Some(DataHeader {
            kind,
            fingerprints: b[13],
            store_id,
            capacity: u64_at(b, 32),
            block_bytes: u64_at(b, 40),
        }))
    }
}

/// How an index file is laid out (the superblock's `layout`): a page
/// table of 16 consecutive slots per key (the first format), a page table
/// of two buckets per key, and a checkpoint followed by a log of changes,
/// which is what a store writes now; the others are rewritten when opened.
pub const LAYOUT_PAGES_LINEAR: u32 = 0;
pub const LAYOUT_PAGES_TWO_BUCKETS: u32 = 2;
pub const LAYOUT_LOGGED: u32 = 3;
/// Where the first region of a logged index starts: after the superblocks.
pub const REGION_START: u64 = 2 * PAGE_BYTES;
/// The `size` of a log entry that removes its key's entry at `logical`
/// (no blob is this large: blobs are at most a quarter of the ring, and
/// smaller than this).
pub const TOMBSTONE_SIZE: u64 = SLOT_SIZE_BYTES_MAX;

/// One of the two superblocks of an index file: where the index's entries
/// are (a logged layout: the region holding a checkpoint and the log after
/// it), and the ring's bounds when it was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    pub kind: Kind,
    /// As in the data header (repairing it needs it).
    pub fingerprints: u8,
    pub store_id: [u8; 16],
    /// Seeds slot checksums: a slot of another store never checks out.
    pub seed: u64,
    pub capacity: u64,
    pub block_bytes: u64,
    /// Slots of a page-table layout; in a logged one, what the table was
    /// allotted when written (for information).
    pub slots: u64,
    /// [`LAYOUT_LOGGED`]; older layouts are rewritten when opened.
    pub layout: u32,
    /// Counts syncs; the newer valid superblock wins.
    pub sequence: u64,
    /// Which of the two superblock places this one is written to (and, in
    /// a page-table layout, which copy of the table it vouches for).
    pub copy: u8,
    /// The ring's bounds: only records in `tail..head` are valid.
    pub tail: u64,
    pub head: u64,
    /// A logged layout: the offset of the region in force, and the bytes
    /// of its checkpoint and of the log that follows it (32-byte entries).
    pub region: u64,
    pub checkpoint_bytes: u64,
    pub log_bytes: u64,
}

impl Superblock {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; usize::try_from(PAGE_BYTES).unwrap_or(4096)];
        b[0..8].copy_from_slice(INDEX_MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12] = self.kind as u8;
        b[13] = self.copy;
        b[14] = self.fingerprints;
        b[16..32].copy_from_slice(&self.store_id);
        b[32..40].copy_from_slice(&self.seed.to_le_bytes());
        b[40..48].copy_from_slice(&self.capacity.to_le_bytes());
        b[48..56].copy_from_slice(&self.block_bytes.to_le_bytes());
        b[56..64].copy_from_slice(&self.slots.to_le_bytes());
        b[64..68].copy_from_slice(&self.layout.to_le_bytes());
        b[72..80].copy_from_slice(&self.sequence.to_le_bytes());
        b[80..88].copy_from_slice(&self.tail.to_le_bytes());
        b[88..96].copy_from_slice(&self.head.to_le_bytes());
        b[96..104].copy_from_slice(&self.region.to_le_bytes());
        b[104..112].copy_from_slice(&self.checkpoint_bytes.to_le_bytes());
        b[112..120].copy_from_slice(&self.log_bytes.to_le_bytes());
        let sum = crc(&b[..124]);
        b[124..128].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// The superblock in `b`, if it is whole and of this version.
    pub fn decode(b: &[u8]) -> Option<Superblock> {
        if &b[0..8] != INDEX_MAGIC || u32_at(b, 124) != crc(&b[..124]) || u32_at(b, 8) != VERSION {
            return None;
        }
        let mut store_id = [0u8; 16];
        store_id.copy_from_slice(&b[16..32]);
        Some(Superblock {
            kind: Kind::from_byte(b[12])?,
            copy: b[13],
            fingerprints: b[14],
            store_id,
            seed: u64_at(b, 32),
            capacity: u64_at(b, 40),
            block_bytes: u64_at(b, 48),
            slots: u64_at(b, 56),
            layout: u32_at(b, 64),
            sequence: u64_at(b, 72),
            tail: u64_at(b, 80),
            head: u64_at(b, 88),
            region: u64_at(b, 96),
            checkpoint_bytes: u64_at(b, 104),
            log_bytes: u64_at(b, 112),
        })
        .filter(|s| s.copy < 2)
    }
}

/// Where things lie in an index file of a page-table layout (read only to
/// rewrite it) of `slots` slots: two superblocks, then two copies of the
/// table, each a page checksum table and the pages.
#[derive(Debug, Clone, Copy)]
pub struct IndexLayout {
    pub pages: u64,
    /// Bytes of a copy's checksum table (4 per page, padded to a page).
    pub crc_table_bytes: u64,
    pub copy_bytes: u64,
}

impl IndexLayout {
    pub fn new(slots: u64) -> Self {
        let pages = slots.div_ceil(SLOTS_PER_PAGE);
        let crc_table_bytes = (pages * 4).next_multiple_of(PAGE_BYTES);
        Self { pages, crc_table_bytes, copy_bytes: crc_table_bytes + pages * PAGE_BYTES }
    }

    pub fn file_bytes(&self) -> u64 {
        2 * PAGE_BYTES + 2 * self.copy_bytes
    }

    pub fn superblock_offset(copy: u8) -> u64 {
        u64::from(copy) * PAGE_BYTES
    }

    pub fn crc_table_offset(&self, copy: u8) -> u64 {
        2 * PAGE_BYTES + u64::from(copy) * self.copy_bytes
    }

    pub fn page_offset(&self, copy: u8, page: u64) -> u64 {
        self.crc_table_offset(copy) + self.crc_table_bytes + page * PAGE_BYTES
    }
}

/// The checksum of one index page.
pub fn page_crc(page: &[u8]) -> u32 {
    crc(page)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::cast_possible_truncation)] // Test data arithmetic.

    use super::*;

    fn fp(n: u8) -> Fingerprint {
        Fingerprint::cas(&CasKey::shared(DigestFunction::Sha256.compute(&[n])))
    }

    /// Keyed fingerprints: one key, one fingerprint; another scope,
    /// function or store, another one; keys of one run share a tweak but
    /// not a fingerprint; the older scheme is BLAKE3 as before.
    #[test]
    fn keyed_fingerprints_separate_scopes_functions_and_stores() {
        use crate::store::Scope;
        let (a, b) = (
            Fingerprinter::new(FINGERPRINTS_KEYED, &[1; 16]),
            Fingerprinter::new(FINGERPRINTS_KEYED, &[2; 16]),
        );
        let d = DigestFunction::Sha256.compute(b"x");
        let key = |scope: &str, d: &Digest| CasKey::new(Scope::new(scope), *d);
        assert_eq!(a.cas(&key("t1", &d)), a.cas(&key("t1", &d)));
        assert_ne!(a.cas(&key("t1", &d)), a.cas(&key("t2", &d)));
        assert_ne!(a.cas(&key("t1", &d)), b.cas(&key("t1", &d)));
        let blake = DigestFunction::Blake3.compute(b"x");
        let same_bytes = Digest::new(DigestFunction::Blake3, *d.hash(), d.size_bytes()).unwrap();
        assert_ne!(a.cas(&key("t1", &d)), a.cas(&key("t1", &same_bytes)), "{blake:?}");
        // A hash that differs in its second half only is another key.
        let mut other = *d.hash();
        other[31] ^= 1;
        let other = Digest::new(DigestFunction::Sha256, other, d.size_bytes()).unwrap();
        assert_ne!(a.cas(&key("t1", &d)), a.cas(&key("t1", &other)));
        let keys: Vec<CasKey> = (0..50u8)
            .map(|n| key(if n < 25 { "t1" } else { "t2" }, &DigestFunction::Sha256.compute(&[n])))
            .collect();
        let many = a.cas_many(&keys);
        assert_eq!(many, keys.iter().map(|k| a.cas(k)).collect::<Vec<_>>());
        assert_eq!(many.iter().collect::<std::collections::HashSet<_>>().len(), 50);
        let old = Fingerprinter::new(FINGERPRINTS_BLAKE3, &[1; 16]);
        assert_eq!(old.cas(&keys[3]), Fingerprint::cas(&keys[3]));
        assert_eq!(old.scheme(), FINGERPRINTS_BLAKE3);
    }

    /// Fingerprints are part of the format: they stay the keyed hash of
    /// exactly these bytes, for short and long scopes alike.
    #[test]
    fn fingerprints_do_not_depend_on_how_they_are_hashed() {
        let digest = DigestFunction::Sha256.compute(b"kiln");
        for scope in [String::new(), "team-a".to_owned(), "x".repeat(500)] {
            let mut h = blake3::Hasher::new();
            h.update(&[Kind::Cas as u8]);
            h.update(&(scope.len() as u64).to_le_bytes());
            h.update(scope.as_bytes());
            h.update(&[1]);
            h.update(digest.hash());
            h.update(&digest.size_bytes().to_le_bytes());
            let expected = h.finalize().as_bytes()[..16].to_vec();
            assert_eq!(
                Fingerprint::of(Kind::Cas, &scope, &digest).0.to_vec(),
                expected,
                "scope of {}",
                scope.len()
            );
        }
    }

    #[test]
    fn fingerprints_separate_stores_scopes_and_functions() {
        let d = DigestFunction::Sha256.compute(b"x");
        let b = DigestFunction::Blake3.compute(b"x");
        let all = [
            Fingerprint::cas(&CasKey::shared(d)),
            Fingerprint::cas(&CasKey::in_instance("main", d)),
            Fingerprint::cas(&CasKey::shared(b)),
            Fingerprint::ac(&AcKey::new("", d)),
            Fingerprint::ac(&AcKey::new("main", d)),
        ];
        let distinct: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), all.len());
    }

    #[test]
    fn record_headers_check_what_they_name() {
        let h = RecordHeader { kind: Kind::Cas, fingerprint: fp(1), size: 12345, logical: 1 << 33 };
        let mut bytes = h.encode();
        RecordHeader::check(&bytes, &h).unwrap();
        let other = RecordHeader { logical: 8, ..h };
        assert!(RecordHeader::check(&bytes, &other).unwrap_err().contains("another one"));
        bytes[30] ^= 1;
        assert!(RecordHeader::check(&bytes, &h).unwrap_err().contains("checksum"));
        assert_eq!(record_len(0), 64);
        assert_eq!(record_len(1), 72);
        assert_eq!(record_len(CRC_CHUNK_BYTES + 1), (64 + CRC_CHUNK_BYTES + 1 + 8).next_multiple_of(8));
    }

    #[test]
    fn slots_round_trip_and_refuse_damage() {
        let seed = 0x1234_5678;
        let slot = Slot { fingerprint: fp(2).0, logical: 99_999_999_999, size: SLOT_SIZE_BYTES_MAX };
        let mut b = [0u8; 32];
        slot.encode(seed, &mut b);
        assert_eq!(Slot::decode(&b, seed), Some(slot));
        assert_eq!(Slot::decode(&b, seed + 1), None, "another store's slot");
        for i in 0..32 {
            let mut damaged = b;
            damaged[i] ^= 0x10;
            assert_ne!(Slot::decode(&damaged, seed), Some(slot), "byte {i}");
        }
        assert_eq!(Slot::decode(&[0; 32], seed), None);
    }

    #[test]
    fn superblocks_and_data_headers_round_trip() {
        let sb = Superblock {
            kind: Kind::Ac,
            fingerprints: FINGERPRINTS_KEYED,
            store_id: [7; 16],
            seed: 42,
            capacity: 1 << 30,
            block_bytes: 1 << 24,
            slots: 1 << 20,
            layout: LAYOUT_LOGGED,
            sequence: 17,
            copy: 1,
            tail: 5 << 24,
            head: 9 << 24,
            region: 3 << 20,
            checkpoint_bytes: 32 << 10,
            log_bytes: 96,
        };
        let mut b = sb.encode();
        assert_eq!(Superblock::decode(&b), Some(sb));
        b[100] ^= 1;
        assert_eq!(Superblock::decode(&b), None);
        let dh = DataHeader {
            kind: Kind::Cas,
            fingerprints: FINGERPRINTS_KEYED,
            store_id: [3; 16],
            capacity: 1 << 30,
            block_bytes: 1 << 24,
        };
        assert_eq!(DataHeader::decode(&dh.encode()).unwrap(), Some(dh));
        assert_eq!(DataHeader::decode(&[0; 4096]).unwrap(), None);
        let layout = IndexLayout::new(1000);
        assert_eq!(layout.pages, 8);
        assert!(layout.page_offset(1, 0) > layout.page_offset(0, 7));
    }
}
