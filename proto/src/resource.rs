//! ByteStream resource names, exactly as the REAPI specifies them.
//!
//! ```text
//! read:  {instance}/blobs/{digest_function/}{hash}/{size}
//!        {instance}/compressed-blobs/{compressor}/{digest_function/}{hash}/{size}
//! write: {instance}/uploads/{uuid}/blobs/{digest_function/}{hash}/{size}{/metadata}
//!        {instance}/uploads/{uuid}/compressed-blobs/{compressor}/{digest_function/}{hash}/{size}{/metadata}
//! ```
//!
//! The instance name may be empty or have several segments; it may not
//! contain a reserved keyword as a segment. A compressed resource names the
//! digest of the *uncompressed* blob. The `digest_function` segment is
//! optional; without it the function is inferred from the hash length.
//! Trailing metadata after an upload's size is ignored.

use std::fmt;

use crate::digest::{Digest, DigestFunction};
use crate::error::{Error, Result};
use crate::text::quoted;

/// Segments that may not appear in an instance name.
pub const RESERVED_SEGMENTS: [&str; 7] =
    ["blobs", "uploads", "actions", "actionResults", "operations", "capabilities", "compressed-blobs"];

pub use crate::limits::{INSTANCE_NAME_LENGTH_MAX, RESOURCE_NAME_LENGTH_MAX};

/// How a ByteStream resource's bytes are encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compressor {
    Identity,
    Zstd,
}

impl Compressor {
    fn parse(name: &str) -> Result<Self> {
        match name {
            "zstd" => Ok(Compressor::Zstd),
            "identity" => Err(Error::invalid_argument(
                "compressed-blobs/identity is not a valid resource; use blobs/ for uncompressed data",
            )),
            other => Err(Error::invalid_argument(format!(
                "compressor {} is not supported; this server supports zstd",
                quoted(other)
            ))),
        }
    }
}

/// Checks an instance name: empty, or `/`-separated non-empty segments, none
/// of them reserved, `.` or `..`.
pub fn validate_instance_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Ok(());
    }
    if name.len() > INSTANCE_NAME_LENGTH_MAX {
        return Err(Error::invalid_argument(format!(
            "instance name is {} bytes long; at most {INSTANCE_NAME_LENGTH_MAX} are allowed",
            name.len()
        )));
    }
    for segment in name.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return Err(Error::invalid_argument(format!(
                "instance name {} has an empty, '.' or '..' segment",
                quoted(name)
            )));
        }
        if RESERVED_SEGMENTS.contains(&segment) {
            return Err(Error::invalid_argument(format!(
                "instance name {} contains the reserved segment {segment:?}",
                quoted(name)
            )));
        }
        if segment.chars().any(char::is_control) {
            return Err(Error::invalid_argument(format!(
                "instance name {} contains a control character",
                quoted(name)
            )));
        }
    }
    Ok(())
}

/// A parsed read resource name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadResource {
    pub instance_name: String,
    pub compressor: Compressor,
    pub digest: Digest,
}

/// A parsed upload resource name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteResource {
    pub instance_name: String,
    pub upload_id: String,
    pub compressor: Compressor,
    pub digest: Digest,
}

impl ReadResource {
    pub fn parse(name: &str) -> Result<Self> {
        let segments = split(name)?;
        let Some(pos) = segments.iter().position(|s| *s == "blobs" || *s == "compressed-blobs") else {
            return Err(Error::invalid_argument(format!(
                "resource name {}: expected {{instance}}/blobs/{{hash}}/{{size}} or {{instance}}/compressed-blobs/zstd/{{hash}}/{{size}}",
                quoted(name)
            )));
        };
        let instance_name = segments[..pos].join("/");
        validate_instance_name(&instance_name)
            .map_err(|e| e.context(format!("resource name {}", quoted(name))))?;
        let (compressor, digest, rest) = parse_blob_part(&segments[pos..])
            .map_err(|e| e.context(format!("resource name {}", quoted(name))))?;
        if !rest.is_empty() {
            return Err(Error::invalid_argument(format!(
                "resource name {}: unexpected segments after the blob size",
                quoted(name)
            )));
        }
        Ok(Self { instance_name, compressor, digest })
    }
}

impl WriteResource {
    pub fn parse(name: &str) -> Result<Self> {
        let segments = split(name)?;
        let Some(pos) = segments.iter().position(|s| *s == "uploads") else {
            return Err(Error::invalid_argument(format!(
                "resource name {}: expected {{instance}}/uploads/{{uuid}}/blobs/{{hash}}/{{size}}",
                quoted(name)
            )));
        };
        let instance_name = segments[..pos].join("/");
        validate_instance_name(&instance_name)
            .map_err(|e| e.context(format!("resource name {}", quoted(name))))?;
        let Some(upload_id) = segments.get(pos + 1).filter(|s| !s.is_empty()) else {
            return Err(Error::invalid_argument(format!(
                "resource name {}: missing upload id after uploads/",
                quoted(name)
            )));
        };
        let (compressor, digest, _metadata) = parse_blob_part(&segments[pos + 2..])
            .map_err(|e| e.context(format!("resource name {}", quoted(name))))?;
        Ok(Self { instance_name, upload_id: (*upload_id).to_owned(), compressor, digest })
    }
}

fn split(name: &str) -> Result<Vec<&str>> {
    if name.is_empty() {
        return Err(Error::invalid_argument("resource_name is required"));
    }
    if name.len() > RESOURCE_NAME_LENGTH_MAX {
        return Err(Error::invalid_argument(format!(
            "resource name is {} bytes long; at most {RESOURCE_NAME_LENGTH_MAX} are allowed",
            name.len()
        )));
    }
    Ok(name.split('/').collect())
}

/// Parses `blobs/...` or `compressed-blobs/{c}/...`; returns what follows the size.
fn parse_blob_part<'a, 'b>(segments: &'a [&'b str]) -> Result<(Compressor, Digest, &'a [&'b str])> {
    let (compressor, rest) = match segments {
        ["blobs", rest @ ..] => (Compressor::Identity, rest),
        ["compressed-blobs", compressor, rest @ ..] => (Compressor::parse(compressor)?, rest),
        _ => return Err(Error::invalid_argument("expected blobs/ or compressed-blobs/{compressor}/")),
    };
    let (function, rest) = match rest {
        [first, rest @ ..] if DigestFunction::from_name(first).is_some() => {
            (DigestFunction::from_name(first), rest)
        }
        [first, second, ..]
            if first.len() != 64
                && second.len() == 64
                && first.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) =>
        {
            return Err(Error::invalid_argument(format!(
                "digest function {} is not supported; this server supports sha256 and blake3",
                quoted(first)
            )));
        }
        _ => (None, rest),
    };
    let [hash, size, rest @ ..] = rest else {
        return Err(Error::invalid_argument("expected {hash}/{size}"));
    };
    let size_bytes = parse_size(size)?;
    let digest = Digest::parse(function, hash, size_bytes)?;
    Ok((compressor, digest, rest))
}

fn parse_size(size: &str) -> Result<i64> {
    if size.is_empty() || size.len() > 19 || !size.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::invalid_argument(format!(
            "size {} is not a non-negative decimal integer",
            quoted(size)
        )));
    }
    size.parse::<i64>().map_err(|_| Error::invalid_argument(format!("size {size} does not fit in int64")))
}

fn write_blob_part(f: &mut fmt::Formatter<'_>, compressor: Compressor, digest: &Digest) -> fmt::Result {
    match compressor {
        Compressor::Identity => f.write_str("blobs/")?,
        Compressor::Zstd => f.write_str("compressed-blobs/zstd/")?,
    }
    if digest.function() != DigestFunction::Sha256 {
        write!(f, "{}/", digest.function())?;
    }
    write!(f, "{}/{}", digest.hash_hex(), digest.size_bytes())
}

fn write_instance(f: &mut fmt::Formatter<'_>, instance_name: &str) -> fmt::Result {
    if instance_name.is_empty() { Ok(()) } else { write!(f, "{instance_name}/") }
}

impl fmt::Display for ReadResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_instance(f, &self.instance_name)?;
        write_blob_part(f, self.compressor, &self.digest)
    }
}

impl fmt::Display for WriteResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_instance(f, &self.instance_name)?;
        write!(f, "uploads/{}/", self.upload_id)?;
        write_blob_part(f, self.compressor, &self.digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Code;

    const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn read_plain_and_multi_segment_instance() {
        let r = ReadResource::parse(&format!("blobs/{H}/0")).unwrap();
        assert_eq!(r.instance_name, "");
        assert_eq!(r.compressor, Compressor::Identity);
        assert_eq!(r.digest.hash_hex(), H);

        let r = ReadResource::parse(&format!("team/a/b/blobs/{H}/42")).unwrap();
        assert_eq!(r.instance_name, "team/a/b");
        assert_eq!(r.digest.size_bytes(), 42);
        assert_eq!(r.to_string(), format!("team/a/b/blobs/{H}/42"));
    }

    #[test]
    fn read_with_digest_function_and_compression() {
        let r = ReadResource::parse(&format!("main/compressed-blobs/zstd/blake3/{H}/7")).unwrap();
        assert_eq!(r.compressor, Compressor::Zstd);
        assert_eq!(r.digest.function(), DigestFunction::Blake3);
        assert_eq!(r.to_string(), format!("main/compressed-blobs/zstd/blake3/{H}/7"));
        let r = ReadResource::parse(&format!("blobs/sha256/{H}/7")).unwrap();
        assert_eq!(r.digest.function(), DigestFunction::Sha256);
        assert_eq!(r.to_string(), format!("blobs/{H}/7"));
    }

    #[test]
    fn write_with_metadata_is_ignored() {
        let w = WriteResource::parse(&format!("ci/uploads/5f1e-uuid/blobs/{H}/10/some/meta")).unwrap();
        assert_eq!(w.instance_name, "ci");
        assert_eq!(w.upload_id, "5f1e-uuid");
        assert_eq!(w.digest.size_bytes(), 10);
        assert_eq!(w.to_string(), format!("ci/uploads/5f1e-uuid/blobs/{H}/10"));

        let w = WriteResource::parse(&format!("uploads/u/compressed-blobs/zstd/blake3/{H}/10/m")).unwrap();
        assert_eq!(w.instance_name, "");
        assert_eq!(w.compressor, Compressor::Zstd);
        assert_eq!(w.digest.function(), DigestFunction::Blake3);
        let round = WriteResource::parse(&w.to_string()).unwrap();
        assert_eq!(round, w);
    }

    #[test]
    fn bad_names_are_invalid_argument() {
        let cases = [
            (String::new(), "required"),
            (format!("{H}/0"), "expected"),
            (format!("blobs/{H}"), "expected {hash}/{size}"),
            (format!("blobs/{H}/-1"), "non-negative"),
            (format!("blobs/{H}/1x"), "non-negative"),
            (format!("blobs/{H}/99999999999999999999"), "non-negative"),
            (format!("blobs/{H}/9223372036854775808"), "int64"),
            (format!("blobs/{}/1", &H[..10]), "10 characters"),
            (format!("blobs/md5/{H}/1"), "digest function \"md5\""),
            (format!("compressed-blobs/deflate/{H}/1"), "compressor \"deflate\""),
            (format!("compressed-blobs/identity/{H}/1"), "use blobs/"),
            (format!("uploads/blobs/{H}/1"), "reserved"),
            (format!("a//b/blobs/{H}/1"), "empty"),
            (format!("../blobs/{H}/1"), "'..'"),
            (format!("blobs/{H}/1/extra"), "unexpected segments"),
            (format!("x/{}/blobs/{H}/1", "y".repeat(5000)), "at most"),
        ];
        for (name, needle) in cases {
            let err = ReadResource::parse(&name).unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{name}");
            assert!(err.message().contains(needle), "{name}: {} lacks {needle}", err.message());
        }
    }

    #[test]
    fn bad_upload_names() {
        for (name, needle) in [
            (format!("blobs/{H}/1"), "uploads"),
            ("i/uploads".to_owned(), "missing upload id"),
            (format!("i/uploads//blobs/{H}/1"), "missing upload id"),
            (format!("i/uploads/u/{H}/1"), "expected blobs/"),
            (format!("actions/uploads/u/blobs/{H}/1"), "reserved"),
        ] {
            let err = WriteResource::parse(&name).unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{name}");
            assert!(err.message().contains(needle), "{name}: {} lacks {needle}", err.message());
        }
    }

    #[test]
    fn instance_names() {
        validate_instance_name("").unwrap();
        validate_instance_name("main").unwrap();
        validate_instance_name("main/dev.team-1").unwrap();
        for bad in ["/main", "main/", "a//b", "capabilities", "x/operations/y", "a\nb"] {
            assert!(validate_instance_name(bad).is_err(), "{bad}");
        }
    }
}
