//! The snapshot stream: a copy of every table of one [`crate::Mvcc`] as of one read
//! transaction, written and read record by record so neither building, sending nor installing
//! a snapshot holds the whole store in memory.
//!
//! Layout: the 8-byte magic `SKIFFSNP`, a little-endian u32 format version, then frames of a
//! little-endian u32 length and a postcard-encoded [`Record`]. The `meta` records come first
//! (so a reader learns the snapshot's applied log id and membership from the head of the file),
//! then `current`, `history`, `events`, and last an [`Record::End`] carrying the number of
//! records before it and a CRC-32 of every frame before it: a stream cut short or damaged
//! anywhere is refused, never half-installed.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use crate::StoreError;

const MAGIC: &[u8; 8] = b"SKIFFSNP";
/// Version of the stream layout written by this build.
pub const VERSION: u32 = 1;
/// Largest frame accepted: a value (1.5 MiB) with its key and header fits many times over; a
/// longer length is damage, not data.
const MAX_FRAME: u32 = 16 << 20;

/// One record of the stream.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Record {
    /// A `meta` entry.
    Meta(String, Vec<u8>),
    /// A `current` entry: key, encoded record.
    Current(Vec<u8>, Vec<u8>),
    /// A `history` entry: key, revision, encoded record.
    History(Vec<u8>, u64, Vec<u8>),
    /// An `events` entry: revision, index, encoded record.
    Event(u64, u32, Vec<u8>),
    /// The end: the number of records before it, and the CRC-32 of their frames.
    End(u64, u32),
}

/// Writes a stream; [`SnapshotWriter::finish`] writes the end record.
pub struct SnapshotWriter<W: Write> {
    out: W,
    records: u64,
    crc: crc32fast::Hasher,
    buf: Vec<u8>,
}

impl<W: Write> std::fmt::Debug for SnapshotWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotWriter")
            .field("records", &self.records)
            .finish_non_exhaustive()
    }
}

impl<W: Write> SnapshotWriter<W> {
    /// Starts a stream on `out` (writes the magic and version).
    pub fn new(mut out: W) -> io::Result<SnapshotWriter<W>> {
        out.write_all(MAGIC)?;
        out.write_all(&VERSION.to_le_bytes())?;
        Ok(SnapshotWriter {
            out,
            records: 0,
            crc: crc32fast::Hasher::new(),
            buf: Vec::new(),
        })
    }

    fn frame(&mut self, r: &Record) -> io::Result<()> {
        self.buf.clear();
        let buf = std::mem::take(&mut self.buf);
        let buf = postcard::to_extend(r, buf).map_err(io::Error::other)?;
        let len = u32::try_from(buf.len())
            .ok()
            .filter(|l| *l <= MAX_FRAME)
            .ok_or_else(|| io::Error::other(format!("record of {} bytes", buf.len())))?;
        self.out.write_all(&len.to_le_bytes())?;
        self.out.write_all(&buf)?;
        self.crc.update(&len.to_le_bytes());
        self.crc.update(&buf);
        self.buf = buf;
        Ok(())
    }

    /// Appends one record (not [`Record::End`]).
    pub fn record(&mut self, r: &Record) -> io::Result<()> {
        debug_assert!(!matches!(r, Record::End(..)));
        self.frame(r)?;
        self.records += 1;
        Ok(())
    }

    /// Writes the end record and returns the output (not flushed or synced).
    pub fn finish(mut self) -> io::Result<W> {
        let end = Record::End(self.records, self.crc.clone().finalize());
        self.frame(&end)?;
        Ok(self.out)
    }
}

/// Reads a stream, checking its layout; `what` names it in errors.
pub struct SnapshotReader<R: Read> {
    input: R,
    what: String,
    records: u64,
    crc: crc32fast::Hasher,
    ended: bool,
    buf: Vec<u8>,
}

impl<R: Read> std::fmt::Debug for SnapshotReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotReader")
            .field("what", &self.what)
            .field("records", &self.records)
            .finish_non_exhaustive()
    }
}

impl<R: Read> SnapshotReader<R> {
    /// Checks the magic and version at the head of `input`.
    pub fn new(mut input: R, what: impl Into<String>) -> Result<SnapshotReader<R>, StoreError> {
        let what = what.into();
        let mut head = [0u8; 12];
        input
            .read_exact(&mut head)
            .map_err(|e| bad(&what, format!("no snapshot header ({e})")))?;
        if &head[..8] != MAGIC {
            return Err(bad(&what, "not a skiff snapshot (bad magic)".into()));
        }
        let version = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(bad(
                &what,
                format!("snapshot layout {version}, this build reads {VERSION}"),
            ));
        }
        Ok(SnapshotReader {
            input,
            what,
            records: 0,
            crc: crc32fast::Hasher::new(),
            ended: false,
            buf: Vec::new(),
        })
    }

    /// The next record, or `None` after a well-formed end. A stream that stops before its end
    /// record, or whose end does not count the records read, is an error.
    fn next_record(&mut self) -> Result<Option<Record>, StoreError> {
        if self.ended {
            return Ok(None);
        }
        let mut len = [0u8; 4];
        self.input.read_exact(&mut len).map_err(|e| {
            bad(
                &self.what,
                format!("cut short after {} records ({e})", self.records),
            )
        })?;
        let len = u32::from_le_bytes(len);
        if len > MAX_FRAME {
            return Err(bad(
                &self.what,
                format!("record {} claims {len} bytes", self.records),
            ));
        }
        self.buf.resize(len as usize, 0);
        self.input.read_exact(&mut self.buf).map_err(|e| {
            bad(
                &self.what,
                format!("cut short in record {} ({e})", self.records),
            )
        })?;
        let r: Record = postcard::from_bytes(&self.buf)
            .map_err(|e| bad(&self.what, format!("record {}: {e}", self.records)))?;
        if let Record::End(n, crc) = r {
            if n != self.records {
                return Err(bad(
                    &self.what,
                    format!("end record counts {n} records, {} were read", self.records),
                ));
            }
            let read = self.crc.clone().finalize();
            if crc != read {
                return Err(bad(
                    &self.what,
                    format!("damaged: checksum {read:08x}, written as {crc:08x}"),
                ));
            }
            self.ended = true;
            return Ok(None);
        }
        self.crc.update(&len.to_le_bytes());
        self.crc.update(&self.buf);
        self.records += 1;
        Ok(Some(r))
    }
}

/// The records, then `None` after a well-formed end (see [`SnapshotReader::next_record`]).
impl<R: Read> Iterator for SnapshotReader<R> {
    type Item = Result<Record, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}

/// Reads a whole stream through, checking its layout, count and checksum.
pub fn check<R: Read>(input: R, what: &str) -> Result<(), StoreError> {
    SnapshotReader::new(input, what)?.try_for_each(|r| r.map(drop))
}

fn bad(what: &str, detail: String) -> StoreError {
    StoreError::Invalid(format!("snapshot {what}: {detail}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(records: &[Record]) -> Vec<u8> {
        let mut w = SnapshotWriter::new(Vec::new()).unwrap();
        for r in records {
            w.record(r).unwrap();
        }
        w.finish().unwrap()
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<Record>, StoreError> {
        SnapshotReader::new(bytes, "test")?.collect()
    }

    /// A small stream: one meta record, one data record.
    fn two_records() -> Vec<u8> {
        stream(&[
            Record::Meta("revision".into(), vec![0; 8]),
            Record::Current(b"/k".to_vec(), vec![3; 40]),
        ])
    }

    #[test]
    fn records_come_back_in_order() {
        let records = vec![
            Record::Meta("revision".into(), 7u64.to_le_bytes().to_vec()),
            Record::Current(b"/a".to_vec(), vec![1; 300]),
            Record::History(b"/a".to_vec(), 7, vec![2; 300]),
            Record::Event(7, 0, b"\x01/a".to_vec()),
        ];
        assert_eq!(read_all(&stream(&records)).unwrap(), records);
        assert_eq!(read_all(&stream(&[])).unwrap(), vec![]);
    }

    #[test]
    fn a_stream_cut_anywhere_is_refused() {
        let full = two_records();
        for cut in 0..full.len() {
            let e = read_all(&full[..cut]).expect_err("a cut stream must not read as whole");
            assert!(e.to_string().contains("snapshot test"), "{e}");
        }
    }

    #[test]
    fn a_changed_byte_anywhere_is_refused() {
        let full = two_records();
        for at in 0..full.len() {
            let mut bad = full.clone();
            bad[at] ^= 0x10;
            assert!(
                read_all(&bad).is_err(),
                "byte {at} changed, stream read as whole"
            );
        }
    }

    #[test]
    fn foreign_or_miscounted_streams_are_refused() {
        let e = read_all(b"PK\x03\x04 not a snapshot").unwrap_err();
        assert!(e.to_string().contains("bad magic"), "{e}");

        let mut other = stream(&[]);
        other[8] = 9;
        let e = read_all(&other).unwrap_err();
        assert!(e.to_string().contains("layout 9"), "{e}");

        // An end record that does not count what came before (records dropped in between).
        let mut w = SnapshotWriter::new(Vec::new()).unwrap();
        w.frame(&Record::Current(b"/k".to_vec(), vec![])).unwrap();
        let bytes = w.finish().unwrap();
        let e = read_all(&bytes).unwrap_err();
        assert!(
            e.to_string().contains("counts 0 records, 1 were read"),
            "{e}"
        );
    }
}
