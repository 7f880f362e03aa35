//! Kernel struct member offsets read from the running kernel's BTF (a small
//! stand-in for CO-RE).
//!
//! The programs are written with aya-ebpf 0.2.1, which emits no CO-RE field
//! relocations, yet every kernel struct they read (`linux_binprm`, `file`,
//! `task_struct`, ...) is laid out differently across kernel versions and
//! configs (randstruct, debug options). So at start the agent reads
//! `/sys/kernel/btf/vmlinux`, resolves the offsets listed in [`Offsets`] and
//! hands them to the programs as load-time globals (`EbpfLoader::set_global`).
//!
//! The reader is our own because aya's BTF type lookup is crate-private and the
//! BTF crate on crates.io (btf-rs) is LGPL. It reads only what offset lookups
//! need: the header, one pass over the type section that records where each
//! type's record starts, and names from the string section when a query asks
//! for them. Malformed input gives a [`BtfError`] naming the byte offset; it
//! never panics.
//!
//! Format: <https://docs.kernel.org/bpf/btf.html> and
//! `include/uapi/linux/btf.h` (Linux 6.18).

use std::{
    fmt, fs,
    hash::{DefaultHasher, Hash, Hasher},
    io,
    ops::Range,
    path::{Path, PathBuf},
    sync::OnceLock,
};

/// Where a kernel built with `CONFIG_DEBUG_INFO_BTF` exposes its own BTF.
pub const VMLINUX_BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

/// `BTF_MAGIC`, read in the blob's own byte order.
const MAGIC: u16 = 0xeb9f;
/// Size of `struct btf_header` in version 1.
const HEADER_LEN: usize = 24;
/// Size of `struct btf_type`, the common part of every type record.
const TYPE_HEADER_LEN: usize = 12;
/// Size of `struct btf_member` (and of `btf_array`, `btf_var_secinfo`).
const MEMBER_LEN: usize = 12;
/// How many typedef/modifier hops or nested anonymous members we follow before
/// calling the chain cyclic. Real kernels need a handful.
const MAX_DEPTH: u32 = 32;

/// Errors from reading a BTF blob and looking up members in it.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("failed to read btf from `{path}`")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("btf blob is {len} bytes, more than the 4 GiB this reader supports")]
    TooLarge { len: usize },
    #[error("btf {what} truncated at byte {offset}: needs {needed} bytes, {available} left")]
    Truncated {
        what: &'static str,
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error("bad btf magic {found:#06x} at byte 0 (expected 0xeb9f)")]
    BadMagic { found: u16 },
    #[error("unsupported btf version {version} at byte 2 (only version 1 is known)")]
    UnsupportedVersion { version: u8 },
    #[error("btf header length {hdr_len} at byte 4 is shorter than {HEADER_LEN}")]
    ShortHeader { hdr_len: u32 },
    #[error("btf {section} section (bytes {start}..{end}) lies outside the {len}-byte blob")]
    SectionOutOfBounds {
        section: &'static str,
        start: u64,
        end: u64,
        len: usize,
    },
    #[error("btf type {type_id} at byte {offset} has unknown kind {kind}")]
    UnknownKind {
        type_id: usize,
        offset: usize,
        kind: u32,
    },
    #[error(
        "btf type id {type_id} referenced at byte {offset} does not exist (the blob has {count} types)"
    )]
    DanglingType {
        type_id: u32,
        offset: usize,
        count: usize,
    },
    #[error(
        "btf name offset {name_off} read at byte {offset} is not a nul-terminated string inside the string section"
    )]
    BadName { name_off: u32, offset: usize },
    #[error(
        "btf type chain through type {type_id} at byte {offset} is deeper than {MAX_DEPTH} (cyclic?)"
    )]
    TooDeep { type_id: u32, offset: usize },
    #[error("no struct or union named `{name}` in the btf")]
    StructNotFound { name: String },
    #[error("empty member path for `{name}`")]
    EmptyPath { name: String },
    #[error("{container} has no member `{member}`")]
    NoMember { container: String, member: String },
    #[error("`{member}` is a {kind}, not a struct or union, so the member path cannot go into it")]
    NotComposite { member: String, kind: &'static str },
    #[error(
        "`{member}` is a bitfield ({bits} bits at bit offset {bit_offset}), so it has no byte offset"
    )]
    Bitfield {
        member: String,
        bits: u32,
        bit_offset: u64,
    },
    #[error("`{member}` starts at bit offset {bit_offset}, which is not byte-aligned")]
    Unaligned { member: String, bit_offset: u64 },
    #[error("btf has several types named `{name}` that disagree on {what} ({first} and {second})")]
    Ambiguous {
        name: String,
        what: String,
        first: u64,
        second: u64,
    },
    #[error("btf type {type_id} ({kind}) at byte {offset} has no size")]
    NoSize {
        type_id: u32,
        kind: &'static str,
        offset: usize,
    },
    #[error("cannot tell the pointer size: the btf has no 4- or 8-byte `long int` type")]
    NoPointerSize,
    #[error("{what} does not fit in 32 bits")]
    Overflow { what: String },
    #[error("failed to resolve `{what}` from the kernel btf")]
    Resolve {
        what: &'static str,
        #[source]
        source: Box<BtfError>,
    },
    #[error("`{what}` is {actual} bytes in this kernel, but the ebpf programs read {expected}")]
    SizeMismatch {
        what: &'static str,
        expected: u32,
        actual: u32,
    },
}

/// `BTF_KIND_*`, plus `Void` for type id 0 (which has no record).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Void,
    Int,
    Ptr,
    Array,
    Struct,
    Union,
    Enum,
    Fwd,
    Typedef,
    Volatile,
    Const,
    Restrict,
    Func,
    FuncProto,
    Var,
    Datasec,
    Float,
    DeclTag,
    TypeTag,
    Enum64,
}

impl Kind {
    fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            1 => Self::Int,
            2 => Self::Ptr,
            3 => Self::Array,
            4 => Self::Struct,
            5 => Self::Union,
            6 => Self::Enum,
            7 => Self::Fwd,
            8 => Self::Typedef,
            9 => Self::Volatile,
            10 => Self::Const,
            11 => Self::Restrict,
            12 => Self::Func,
            13 => Self::FuncProto,
            14 => Self::Var,
            15 => Self::Datasec,
            16 => Self::Float,
            17 => Self::DeclTag,
            18 => Self::TypeTag,
            19 => Self::Enum64,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Void => "void",
            Self::Int => "int",
            Self::Ptr => "pointer",
            Self::Array => "array",
            Self::Struct => "struct",
            Self::Union => "union",
            Self::Enum => "enum",
            Self::Fwd => "forward declaration",
            Self::Typedef => "typedef",
            Self::Volatile => "volatile",
            Self::Const => "const",
            Self::Restrict => "restrict",
            Self::Func => "function",
            Self::FuncProto => "function prototype",
            Self::Var => "variable",
            Self::Datasec => "data section",
            Self::Float => "float",
            Self::DeclTag => "decl tag",
            Self::TypeTag => "type tag",
            Self::Enum64 => "enum64",
        }
    }

    /// Bytes of kind-specific data after the common `btf_type` record.
    fn extra_len(self, vlen: usize) -> usize {
        match self {
            Self::Int | Self::Var | Self::DeclTag => 4,
            Self::Array => MEMBER_LEN,
            Self::Struct | Self::Union | Self::Datasec | Self::Enum64 => MEMBER_LEN * vlen,
            Self::Enum | Self::FuncProto => 8 * vlen,
            _ => 0,
        }
    }

    fn is_composite(self) -> bool {
        matches!(self, Self::Struct | Self::Union)
    }

    /// Kinds that only qualify or rename another type.
    fn is_modifier(self) -> bool {
        matches!(
            self,
            Self::Typedef | Self::Volatile | Self::Const | Self::Restrict | Self::TypeTag
        )
    }
}

/// One decoded `btf_type` record.
#[derive(Clone, Copy, Debug)]
struct Ty {
    id: u32,
    /// Byte offset of the record in the blob.
    offset: usize,
    name_off: u32,
    kind: Kind,
    vlen: usize,
    kind_flag: bool,
    size_or_type: u32,
}

impl Ty {
    const VOID: Self = Self {
        id: 0,
        offset: 0,
        name_off: 0,
        kind: Kind::Void,
        vlen: 0,
        kind_flag: false,
        size_or_type: 0,
    };
}

/// A member found by name inside a struct or union (possibly inside its
/// anonymous members).
#[derive(Clone, Copy, Debug)]
struct FoundMember {
    /// Bit offset from the start of the struct searched.
    bit_offset: u64,
    /// Bitfield width from a `kind_flag` struct, 0 for a plain member.
    bitfield_bits: u32,
    type_id: u32,
    /// Byte offset of the `btf_member` record.
    record: usize,
}

/// The kernel's BTF: the blob plus an index from type id to record offset.
pub struct KernelBtf {
    data: Vec<u8>,
    big_endian: bool,
    strings: Range<usize>,
    /// `type_offsets[id - 1]` is where type `id`'s record starts.
    type_offsets: Vec<u32>,
    /// (hash of the name, type id) of every named struct, union, typedef and
    /// int, sorted; built by the first lookup by name.
    by_name: OnceLock<Vec<(u64, u32)>>,
}

impl fmt::Debug for KernelBtf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelBtf")
            .field("bytes", &self.data.len())
            .field("types", &self.type_offsets.len())
            .field("big_endian", &self.big_endian)
            .finish_non_exhaustive()
    }
}

fn read_u32(data: &[u8], offset: usize, big_endian: bool) -> Option<u32> {
    let bytes: [u8; 4] = data.get(offset..offset.checked_add(4)?)?.try_into().ok()?;
    Some(if big_endian {
        u32::from_be_bytes(bytes)
    } else {
        u32::from_le_bytes(bytes)
    })
}

/// Bounds of a section that starts `off` bytes after the header.
fn section(
    name: &'static str,
    hdr_len: u32,
    off: u32,
    len: u32,
    blob_len: usize,
) -> Result<Range<usize>, BtfError> {
    let start = u64::from(hdr_len) + u64::from(off);
    let end = start + u64::from(len);
    match (usize::try_from(start), usize::try_from(end)) {
        (Ok(s), Ok(e)) if e <= blob_len => Ok(s..e),
        _ => Err(BtfError::SectionOutOfBounds {
            section: name,
            start,
            end,
            len: blob_len,
        }),
    }
}

impl KernelBtf {
    /// Reads and indexes a BTF file, normally [`VMLINUX_BTF_PATH`].
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, BtfError> {
        let path = path.as_ref();
        let data = fs::read(path).map_err(|source| BtfError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_bytes(data)
    }

    /// Validates the header and indexes every type record in one pass.
    pub fn from_bytes(data: Vec<u8>) -> Result<Self, BtfError> {
        let len = data.len();
        if u32::try_from(len).is_err() {
            return Err(BtfError::TooLarge { len });
        }
        if len < HEADER_LEN {
            return Err(BtfError::Truncated {
                what: "header",
                offset: 0,
                needed: HEADER_LEN,
                available: len,
            });
        }
        let big_endian = match u16::from_le_bytes([data[0], data[1]]) {
            MAGIC => false,
            found if found.swap_bytes() == MAGIC => true,
            found => return Err(BtfError::BadMagic { found }),
        };
        if data[2] != 1 {
            return Err(BtfError::UnsupportedVersion { version: data[2] });
        }
        let word = |offset: usize| read_u32(&data, offset, big_endian).unwrap_or_default();
        let hdr_len = word(4);
        // Later versions may append header fields; hdr_len covers them.
        if (hdr_len as usize) < HEADER_LEN {
            return Err(BtfError::ShortHeader { hdr_len });
        }
        section("header", 0, 0, hdr_len, len)?;
        let types = section("type", hdr_len, word(8), word(12), len)?;
        let strings = section("string", hdr_len, word(16), word(20), len)?;

        // Vmlinux averages about 50 bytes per type record.
        let mut type_offsets = Vec::with_capacity(types.len() / 48);
        let mut pos = types.start;
        while pos < types.end {
            let type_id = type_offsets.len() + 1;
            let available = types.end - pos;
            let truncated = |needed| BtfError::Truncated {
                what: "type record",
                offset: pos,
                needed,
                available,
            };
            if available < TYPE_HEADER_LEN {
                return Err(truncated(TYPE_HEADER_LEN));
            }
            let info = word(pos + 4);
            let raw_kind = (info >> 24) & 0x1f;
            let kind = Kind::from_raw(raw_kind).ok_or(BtfError::UnknownKind {
                type_id,
                offset: pos,
                kind: raw_kind,
            })?;
            let record_len = TYPE_HEADER_LEN + kind.extra_len((info & 0xffff) as usize);
            if available < record_len {
                return Err(truncated(record_len));
            }
            // `len` fits in u32 (checked above), so does `pos`.
            type_offsets.push(u32::try_from(pos).map_err(|_| BtfError::TooLarge { len })?);
            pos += record_len;
        }
        Ok(Self {
            data,
            big_endian,
            strings,
            type_offsets,
            by_name: OnceLock::new(),
        })
    }

    /// Number of types (the highest type id).
    #[must_use]
    pub fn type_count(&self) -> usize {
        self.type_offsets.len()
    }

    /// Byte offset of a (possibly nested) member from the start of the struct
    /// or union `struct_name`, e.g. `("file", &["f_path", "dentry"])`.
    ///
    /// Anonymous struct/union members are searched transparently, typedefs and
    /// qualifiers are followed, and a bitfield or a member not on a byte
    /// boundary is an error. If several structs share the name (BTF dedup
    /// leaves a few), they must agree on the offset.
    pub fn member_offset(&self, struct_name: &str, path: &[&str]) -> Result<u32, BtfError> {
        let (byte_offset, _) = self.resolve_member(struct_name, path)?;
        u32::try_from(byte_offset).map_err(|_| BtfError::Overflow {
            what: format!("offset of `{struct_name}.{}`", path.join(".")),
        })
    }

    /// Size in bytes of a (possibly nested) member's type, following typedefs.
    pub fn member_size(&self, struct_name: &str, path: &[&str]) -> Result<u32, BtfError> {
        let (_, found) = self.resolve_member(struct_name, path)?;
        let size = self.type_size(found.type_id, found.record + 4, 0)?;
        u32::try_from(size).map_err(|_| BtfError::Overflow {
            what: format!("size of `{struct_name}.{}`", path.join(".")),
        })
    }

    /// Size in bytes of the struct or union `name`.
    pub fn struct_size(&self, name: &str) -> Result<u32, BtfError> {
        let mut size: Option<u32> = None;
        for root in self.roots(name)? {
            match size {
                Some(first) if first != root.size_or_type => {
                    return Err(BtfError::Ambiguous {
                        name: name.to_owned(),
                        what: "its size".to_owned(),
                        first: first.into(),
                        second: root.size_or_type.into(),
                    });
                }
                _ => size = Some(root.size_or_type),
            }
        }
        size.ok_or_else(|| BtfError::StructNotFound {
            name: name.to_owned(),
        })
    }

    fn word(&self, offset: usize) -> Result<u32, BtfError> {
        read_u32(&self.data, offset, self.big_endian).ok_or(BtfError::Truncated {
            what: "type record",
            offset,
            needed: 4,
            available: self.data.len().saturating_sub(offset),
        })
    }

    /// The type at position `index` of the index (type id `index + 1`).
    fn ty_at_index(&self, index: usize) -> Result<Ty, BtfError> {
        let offset = self.type_offsets.get(index).copied().unwrap_or(u32::MAX) as usize;
        let info = self.word(offset + 4)?;
        let raw_kind = (info >> 24) & 0x1f;
        let kind = Kind::from_raw(raw_kind).ok_or(BtfError::UnknownKind {
            type_id: index + 1,
            offset,
            kind: raw_kind,
        })?;
        Ok(Ty {
            id: u32::try_from(index + 1).unwrap_or(u32::MAX),
            offset,
            name_off: self.word(offset)?,
            kind,
            vlen: (info & 0xffff) as usize,
            kind_flag: info >> 31 == 1,
            size_or_type: self.word(offset + 8)?,
        })
    }

    /// Type `id`, whose id was read at byte `referenced_at`.
    fn ty(&self, id: u32, referenced_at: usize) -> Result<Ty, BtfError> {
        if id == 0 {
            return Ok(Ty::VOID);
        }
        let index = id as usize - 1;
        if index >= self.type_offsets.len() {
            return Err(BtfError::DanglingType {
                type_id: id,
                offset: referenced_at,
                count: self.type_offsets.len(),
            });
        }
        self.ty_at_index(index)
    }

    /// Follows typedefs and qualifiers from type `id` to the type they name.
    fn skip_modifiers(&self, id: u32, referenced_at: usize) -> Result<Ty, BtfError> {
        let mut ty = self.ty(id, referenced_at)?;
        for _ in 0..MAX_DEPTH {
            if !ty.kind.is_modifier() {
                return Ok(ty);
            }
            ty = self.ty(ty.size_or_type, ty.offset + 8)?;
        }
        Err(BtfError::TooDeep {
            type_id: ty.id,
            offset: ty.offset,
        })
    }

    /// The name at `name_off` in the string section, read at byte `read_at`.
    fn name(&self, name_off: u32, read_at: usize) -> Result<&[u8], BtfError> {
        if name_off == 0 {
            return Ok(b"");
        }
        let bad = || BtfError::BadName {
            name_off,
            offset: read_at,
        };
        let start = self
            .strings
            .start
            .checked_add(name_off as usize)
            .ok_or_else(bad)?;
        let rest = self.data.get(start..self.strings.end).ok_or_else(bad)?;
        let end = rest.iter().position(|&b| b == 0).ok_or_else(bad)?;
        Ok(&rest[..end])
    }

    /// "struct path", "anonymous union", ... for messages.
    fn describe(&self, ty: &Ty) -> String {
        match self.name(ty.name_off, ty.offset) {
            Ok(name) if !name.is_empty() => {
                format!("{} {}", ty.kind.name(), String::from_utf8_lossy(name))
            }
            _ => format!("anonymous {}", ty.kind.name()),
        }
    }

    /// Every struct or union named `name`; failing that, the structs or
    /// unions that typedefs named `name` stand for.
    fn roots(&self, name: &str) -> Result<Vec<Ty>, BtfError> {
        let named = self.named(name)?;
        let mut found: Vec<Ty> = named
            .iter()
            .filter(|ty| ty.kind.is_composite())
            .copied()
            .collect();
        if found.is_empty() {
            for typedef in named.iter().filter(|ty| ty.kind == Kind::Typedef) {
                let target = self.skip_modifiers(typedef.size_or_type, typedef.offset + 8)?;
                if target.kind.is_composite() {
                    found.push(target);
                }
            }
        }
        if found.is_empty() {
            return Err(BtfError::StructNotFound {
                name: name.to_owned(),
            });
        }
        Ok(found)
    }

    /// Every struct, union, typedef and int named `name`, in type id order.
    fn named(&self, name: &str) -> Result<Vec<Ty>, BtfError> {
        let index = if let Some(index) = self.by_name.get() {
            index
        } else {
            let built = self.name_index()?;
            self.by_name.get_or_init(|| built)
        };
        let hash = name_hash(name.as_bytes());
        let start = index.partition_point(|&(h, _)| h < hash);
        let mut named = Vec::new();
        for &(_, id) in index[start..].iter().take_while(|&&(h, _)| h == hash) {
            let ty = self.ty(id, 0)?;
            if self.name(ty.name_off, ty.offset)? == name.as_bytes() {
                named.push(ty);
            }
        }
        Ok(named)
    }

    /// One pass over the types for [`Self::by_name`].
    fn name_index(&self) -> Result<Vec<(u64, u32)>, BtfError> {
        let mut index = Vec::new();
        for (i, &offset) in self.type_offsets.iter().enumerate() {
            let offset = offset as usize;
            let kind = (self.word(offset + 4)? >> 24) & 0x1f;
            // BTF_KIND_INT, STRUCT, UNION, TYPEDEF.
            if !matches!(kind, 1 | 4 | 5 | 8) {
                continue;
            }
            let name = self.name(self.word(offset)?, offset)?;
            if !name.is_empty() {
                let id = u32::try_from(i + 1).unwrap_or(u32::MAX);
                index.push((name_hash(name), id));
            }
        }
        index.sort_unstable();
        Ok(index)
    }

    /// Looks `struct_name` up and walks `path` in every candidate; returns the
    /// byte offset and the last member found.
    fn resolve_member(
        &self,
        struct_name: &str,
        path: &[&str],
    ) -> Result<(u64, FoundMember), BtfError> {
        if path.is_empty() {
            return Err(BtfError::EmptyPath {
                name: struct_name.to_owned(),
            });
        }
        let mut resolved: Option<(u64, FoundMember)> = None;
        let mut first_error = None;
        for root in self.roots(struct_name)? {
            match self.walk_path(root, struct_name, path) {
                Ok(this) => match resolved {
                    Some((first, _)) if first != this.0 => {
                        return Err(BtfError::Ambiguous {
                            name: struct_name.to_owned(),
                            what: format!("the offset of `{}`", path.join(".")),
                            first,
                            second: this.0,
                        });
                    }
                    Some(_) => {}
                    None => resolved = Some(this),
                },
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        match (resolved, first_error) {
            (Some(resolved), _) => Ok(resolved),
            (None, Some(error)) => Err(error),
            (None, None) => Err(BtfError::StructNotFound {
                name: struct_name.to_owned(),
            }),
        }
    }

    /// Walks `path` from the struct or union `root`.
    fn walk_path(
        &self,
        root: Ty,
        struct_name: &str,
        path: &[&str],
    ) -> Result<(u64, FoundMember), BtfError> {
        let mut current = root;
        let mut container = format!("{} {struct_name}", root.kind.name());
        let mut walked = struct_name.to_owned();
        let mut bits = 0_u64;
        let mut last: Option<FoundMember> = None;
        for &segment in path {
            if let Some(previous) = last {
                current = self.skip_modifiers(previous.type_id, previous.record + 4)?;
                if !current.kind.is_composite() {
                    return Err(BtfError::NotComposite {
                        member: walked,
                        kind: current.kind.name(),
                    });
                }
                container = format!("{} ({walked})", self.describe(&current));
            }
            let found = if segment.is_empty() {
                None
            } else {
                self.find_member(current, segment, 0)?
            };
            let found = found.ok_or_else(|| BtfError::NoMember {
                container: container.clone(),
                member: segment.to_owned(),
            })?;
            walked.push('.');
            walked.push_str(segment);
            self.check_byte_member(&found, &walked)?;
            bits += found.bit_offset;
            last = Some(found);
        }
        match last {
            Some(found) => Ok((bits / 8, found)),
            None => Err(BtfError::EmptyPath {
                name: struct_name.to_owned(),
            }),
        }
    }

    /// Rejects bitfields (either encoding) and members off a byte boundary.
    fn check_byte_member(&self, found: &FoundMember, member: &str) -> Result<(), BtfError> {
        let bitfield = |bits| BtfError::Bitfield {
            member: member.to_owned(),
            bits,
            bit_offset: found.bit_offset,
        };
        if found.bitfield_bits != 0 {
            return Err(bitfield(found.bitfield_bits));
        }
        // Without kind_flag, a bitfield is a member whose int type is narrower
        // than its storage or starts at a bit offset.
        let ty = self.skip_modifiers(found.type_id, found.record + 4)?;
        if ty.kind == Kind::Int {
            let encoding = self.word(ty.offset + TYPE_HEADER_LEN)?;
            let int_bits = encoding & 0xff;
            let int_offset = (encoding >> 16) & 0xff;
            if int_offset != 0 || u64::from(int_bits) != u64::from(ty.size_or_type) * 8 {
                return Err(bitfield(int_bits));
            }
        }
        if !found.bit_offset.is_multiple_of(8) {
            return Err(BtfError::Unaligned {
                member: member.to_owned(),
                bit_offset: found.bit_offset,
            });
        }
        Ok(())
    }

    /// Finds member `name` of the struct or union `composite`, descending into
    /// its anonymous struct/union members.
    fn find_member(
        &self,
        composite: Ty,
        name: &str,
        depth: u32,
    ) -> Result<Option<FoundMember>, BtfError> {
        if depth > MAX_DEPTH {
            return Err(BtfError::TooDeep {
                type_id: composite.id,
                offset: composite.offset,
            });
        }
        for i in 0..composite.vlen {
            let record = composite.offset + TYPE_HEADER_LEN + MEMBER_LEN * i;
            let name_off = self.word(record)?;
            let type_id = self.word(record + 4)?;
            let raw_offset = self.word(record + 8)?;
            let (bit_offset, bitfield_bits) = if composite.kind_flag {
                (raw_offset & 0x00ff_ffff, raw_offset >> 24)
            } else {
                (raw_offset, 0)
            };
            let member_name = self.name(name_off, record)?;
            if member_name == name.as_bytes() {
                return Ok(Some(FoundMember {
                    bit_offset: u64::from(bit_offset),
                    bitfield_bits,
                    type_id,
                    record,
                }));
            }
            if member_name.is_empty() {
                let inner = self.skip_modifiers(type_id, record + 4)?;
                if inner.kind.is_composite()
                    && let Some(found) = self.find_member(inner, name, depth + 1)?
                {
                    return Ok(Some(FoundMember {
                        bit_offset: found.bit_offset + u64::from(bit_offset),
                        ..found
                    }));
                }
            }
        }
        Ok(None)
    }

    /// Size in bytes of type `id` (read at byte `referenced_at`).
    fn type_size(&self, id: u32, referenced_at: usize, depth: u32) -> Result<u64, BtfError> {
        let ty = self.skip_modifiers(id, referenced_at)?;
        match ty.kind {
            Kind::Int | Kind::Struct | Kind::Union | Kind::Enum | Kind::Enum64 | Kind::Float => {
                Ok(u64::from(ty.size_or_type))
            }
            Kind::Ptr => self.pointer_size(),
            Kind::Array => {
                if depth > MAX_DEPTH {
                    return Err(BtfError::TooDeep {
                        type_id: ty.id,
                        offset: ty.offset,
                    });
                }
                let array = ty.offset + TYPE_HEADER_LEN;
                let element = self.type_size(self.word(array)?, array, depth + 1)?;
                Ok(element.saturating_mul(u64::from(self.word(array + 8)?)))
            }
            _ => Err(BtfError::NoSize {
                type_id: ty.id,
                kind: ty.kind.name(),
                offset: ty.offset,
            }),
        }
    }

    /// BTF has no pointer size; like libbpf, take the size of `long`.
    fn pointer_size(&self) -> Result<u64, BtfError> {
        for name in ["long int", "long unsigned int"] {
            for ty in self.named(name)? {
                if ty.kind == Kind::Int && matches!(ty.size_or_type, 4 | 8) {
                    return Ok(u64::from(ty.size_or_type));
                }
            }
        }
        Err(BtfError::NoPointerSize)
    }
}

fn name_hash(name: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    name.hash(&mut hasher);
    hasher.finish()
}

/// Byte offsets of the kernel struct members the eBPF programs read, resolved
/// for the running kernel. The agent copies each field into the load-time
/// global of the same name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    /// `struct linux_binprm` -> `file` (`struct file *`).
    pub linux_binprm_file: u32,
    /// `struct linux_binprm` -> `filename` (`const char *`).
    pub linux_binprm_filename: u32,
    /// `struct linux_binprm` -> `interp` (`const char *`): the same pointer
    /// as `filename` until a script's interpreter takes over.
    pub linux_binprm_interp: u32,
    /// `struct linux_binprm` -> `buf` (`char[256]`): the file's first bytes.
    pub linux_binprm_buf: u32,
    /// `struct file` -> `f_inode` (`struct inode *`).
    pub file_f_inode: u32,
    /// `struct inode` -> `i_ino` (`unsigned long`).
    pub inode_i_ino: u32,
    /// `struct inode` -> `i_sb` (`struct super_block *`).
    pub inode_i_sb: u32,
    /// `struct super_block` -> `s_dev` (`dev_t`).
    pub super_block_s_dev: u32,
    /// `struct task_struct` -> `ptrace` (`unsigned int`).
    pub task_struct_ptrace: u32,
    /// `struct task_struct` -> `real_parent` (`struct task_struct *`).
    pub task_struct_real_parent: u32,
    /// `struct task_struct` -> `tgid` (`pid_t`).
    pub task_struct_tgid: u32,
    /// `struct socket` -> `type` (`short`).
    pub socket_type: u32,
    /// `struct socket` -> `sk` (`struct sock *`).
    pub socket_sk: u32,
    /// `struct inode` -> `i_mode` (`umode_t`).
    pub inode_i_mode: u32,
    /// `struct inode` -> `i_rdev` (`dev_t`).
    pub inode_i_rdev: u32,
    /// `struct super_block` -> `s_magic` (`unsigned long`).
    pub super_block_s_magic: u32,
    /// `struct task_struct` -> `group_leader` (`struct task_struct *`).
    pub task_struct_group_leader: u32,
    /// `struct task_struct` -> `start_boottime` (`u64`).
    pub task_struct_start_boottime: u32,
    /// `struct file` -> `f_path.dentry` (`struct dentry *`).
    pub file_f_path_dentry: u32,
    /// `struct file` -> `f_mode` (`fmode_t`).
    pub file_f_mode: u32,
    /// `struct dentry` -> `d_parent` (`struct dentry *`).
    pub dentry_d_parent: u32,
    /// `struct dentry` -> `d_inode` (`struct inode *`).
    pub dentry_d_inode: u32,
    /// `struct cgroup` -> `kn` (`struct kernfs_node *`).
    pub cgroup_kn: u32,
    /// `struct kernfs_node` -> `id` (`u64`).
    pub kernfs_node_id: u32,
    /// `struct kernfs_node` -> `parent` (`struct kernfs_node *`).
    pub kernfs_node_parent: u32,
    /// `struct cgroup` -> `root` (`struct cgroup_root *`).
    pub cgroup_root: u32,
    /// `struct cgroup_root` -> `hierarchy_id` (`int`).
    pub cgroup_root_hierarchy_id: u32,
    /// `struct msghdr` -> `msg_name` (`void *`).
    pub msghdr_msg_name: u32,
    /// `struct msghdr` -> `msg_namelen` (`int`).
    pub msghdr_msg_namelen: u32,
    /// `struct sock` -> `__sk_common.skc_family` (`unsigned short`).
    pub sock_skc_family: u32,
    /// `struct sock` -> `sk_protocol` (`u16`; a bitfield before v5.6,
    /// which the programs cannot read: such kernels are refused here).
    pub sock_sk_protocol: u32,
    /// `struct inode` -> `i_ctime_sec` (`time64_t`; v6.11+), else
    /// `__i_ctime.tv_sec` (v6.6 to v6.10).
    pub inode_i_ctime_sec: u32,
    /// `struct inode` -> `i_ctime_nsec` (`u32`; v6.11+), else
    /// `__i_ctime.tv_nsec` (`long`, of which the programs read the low
    /// 32 bits: nanoseconds fit, and the kernel is little-endian).
    pub inode_i_ctime_nsec: u32,
    /// `struct inode` -> `i_size` (`loff_t`).
    pub inode_i_size: u32,
    /// `struct inode` -> `i_generation` (`u32`).
    pub inode_i_generation: u32,
    /// `struct task_struct` -> `mm` (`struct mm_struct *`).
    pub task_struct_mm: u32,
    /// `struct mm_struct` -> `exe_file` (`struct file *`).
    pub mm_struct_exe_file: u32,
    /// `struct vm_area_struct` -> `vm_file` (`struct file *`).
    pub vm_area_struct_vm_file: u32,
    /// `struct inode` -> `__i_nlink` (`unsigned int`, in a union with the
    /// read-only `i_nlink`).
    pub inode_i_nlink: u32,
    /// `struct dentry` -> `d_name.name` (`const unsigned char *`).
    pub dentry_d_name_name: u32,
    /// `struct mm_struct` -> `arg_start` (`unsigned long`): where the new
    /// image's argv strings begin.
    pub mm_struct_arg_start: u32,
    /// `struct mm_struct` -> `arg_end` (`unsigned long`): also where the
    /// environment strings begin.
    pub mm_struct_arg_end: u32,
    /// `struct mm_struct` -> `env_end` (`unsigned long`).
    pub mm_struct_env_end: u32,
}

impl Offsets {
    /// Resolves every offset, and checks each member has the size the
    /// programs read (8 for pointers and `unsigned long`: 64-bit kernels
    /// only). Errors name the member that failed.
    pub fn resolve(btf: &KernelBtf) -> Result<Self, BtfError> {
        let get = |what: &'static str, expected: u32| {
            let wrap = |source| BtfError::Resolve {
                what,
                source: Box::new(source),
            };
            let mut parts = what.split('.');
            let struct_name = parts.next().unwrap_or_default();
            let path: Vec<&str> = parts.collect();
            let offset = btf.member_offset(struct_name, &path).map_err(wrap)?;
            let actual = btf.member_size(struct_name, &path).map_err(wrap)?;
            if actual != expected {
                return Err(BtfError::SizeMismatch {
                    what,
                    expected,
                    actual,
                });
            }
            Ok(offset)
        };
        Ok(Self {
            linux_binprm_file: get("linux_binprm.file", 8)?,
            linux_binprm_filename: get("linux_binprm.filename", 8)?,
            linux_binprm_interp: get("linux_binprm.interp", 8)?,
            linux_binprm_buf: get("linux_binprm.buf", 256)?,
            file_f_inode: get("file.f_inode", 8)?,
            inode_i_ino: get("inode.i_ino", 8)?,
            inode_i_sb: get("inode.i_sb", 8)?,
            super_block_s_dev: get("super_block.s_dev", 4)?,
            task_struct_ptrace: get("task_struct.ptrace", 4)?,
            task_struct_real_parent: get("task_struct.real_parent", 8)?,
            task_struct_tgid: get("task_struct.tgid", 4)?,
            socket_type: get("socket.type", 2)?,
            socket_sk: get("socket.sk", 8)?,
            inode_i_mode: get("inode.i_mode", 2)?,
            inode_i_rdev: get("inode.i_rdev", 4)?,
            super_block_s_magic: get("super_block.s_magic", 8)?,
            task_struct_group_leader: get("task_struct.group_leader", 8)?,
            task_struct_start_boottime: get("task_struct.start_boottime", 8)?,
            file_f_path_dentry: get("file.f_path.dentry", 8)?,
            file_f_mode: get("file.f_mode", 4)?,
            dentry_d_parent: get("dentry.d_parent", 8)?,
            dentry_d_inode: get("dentry.d_inode", 8)?,
            cgroup_kn: get("cgroup.kn", 8)?,
            kernfs_node_id: get("kernfs_node.id", 8)?,
            // Renamed `__parent` (RCU-protected) in v6.15.
            kernfs_node_parent: get("kernfs_node.parent", 8)
                .or_else(|_| get("kernfs_node.__parent", 8))?,
            cgroup_root: get("cgroup.root", 8)?,
            cgroup_root_hierarchy_id: get("cgroup_root.hierarchy_id", 4)?,
            msghdr_msg_name: get("msghdr.msg_name", 8)?,
            msghdr_msg_namelen: get("msghdr.msg_namelen", 4)?,
            sock_skc_family: get("sock.__sk_common.skc_family", 2)?,
            sock_sk_protocol: get("sock.sk_protocol", 2)?,
            // v6.11 split `__i_ctime` (a `timespec64`) into two members.
            inode_i_ctime_sec: get("inode.i_ctime_sec", 8)
                .or_else(|_| get("inode.__i_ctime.tv_sec", 8))?,
            inode_i_ctime_nsec: get("inode.i_ctime_nsec", 4)
                .or_else(|_| get("inode.__i_ctime.tv_nsec", 8))?,
            inode_i_size: get("inode.i_size", 8)?,
            inode_i_generation: get("inode.i_generation", 4)?,
            task_struct_mm: get("task_struct.mm", 8)?,
            mm_struct_exe_file: get("mm_struct.exe_file", 8)?,
            vm_area_struct_vm_file: get("vm_area_struct.vm_file", 8)?,
            inode_i_nlink: get("inode.__i_nlink", 4)?,
            dentry_d_name_name: get("dentry.d_name.name", 8)?,
            mm_struct_arg_start: get("mm_struct.arg_start", 8)?,
            mm_struct_arg_end: get("mm_struct.arg_end", 8)?,
            mm_struct_env_end: get("mm_struct.env_end", 8)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INT: u32 = 1;
    const PTR: u32 = 2;
    const ARRAY: u32 = 3;
    const STRUCT: u32 = 4;
    const UNION: u32 = 5;
    const TYPEDEF: u32 = 8;
    const CONST: u32 = 10;

    /// Emits a BTF blob: header, type section, string section.
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
        big_endian: bool,
    }

    impl Builder {
        fn new() -> Self {
            Self {
                types: Vec::new(),
                strings: vec![0],
                next_id: 1,
                big_endian: false,
            }
        }

        fn string(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = u32::try_from(self.strings.len()).unwrap();
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }

        fn word(&mut self, v: u32) {
            let bytes = if self.big_endian {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            };
            self.types.extend_from_slice(&bytes);
        }

        /// The common `btf_type` record; kind-specific data follows via `word`.
        fn raw(
            &mut self,
            name: &str,
            kind: u32,
            vlen: u32,
            kind_flag: bool,
            size_or_type: u32,
        ) -> u32 {
            let name_off = self.string(name);
            self.word(name_off);
            self.word(vlen | (kind << 24) | (u32::from(kind_flag) << 31));
            self.word(size_or_type);
            let id = self.next_id;
            self.next_id += 1;
            id
        }

        fn int(&mut self, name: &str, size: u32) -> u32 {
            self.int_bits(name, size, size * 8)
        }

        fn int_bits(&mut self, name: &str, size: u32, bits: u32) -> u32 {
            let id = self.raw(name, INT, 0, false, size);
            self.word(bits);
            id
        }

        fn ptr(&mut self, target: u32) -> u32 {
            self.raw("", PTR, 0, false, target)
        }

        fn array(&mut self, element: u32, index: u32, len: u32) -> u32 {
            let id = self.raw("", ARRAY, 0, false, 0);
            self.word(element);
            self.word(index);
            self.word(len);
            id
        }

        fn typedef(&mut self, name: &str, target: u32) -> u32 {
            self.raw(name, TYPEDEF, 0, false, target)
        }

        /// A struct or union; members are (name, type, raw offset word).
        fn composite(
            &mut self,
            kind: u32,
            name: &str,
            size: u32,
            kind_flag: bool,
            members: &[(&str, u32, u32)],
        ) -> u32 {
            let vlen = u32::try_from(members.len()).unwrap();
            let id = self.raw(name, kind, vlen, kind_flag, size);
            for &(member, ty, offset) in members {
                let name_off = self.string(member);
                self.word(name_off);
                self.word(ty);
                self.word(offset);
            }
            id
        }

        fn strukt(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
            self.composite(STRUCT, name, size, false, members)
        }

        fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            let mut put = |v: u32| {
                out.extend_from_slice(&if self.big_endian {
                    v.to_be_bytes()
                } else {
                    v.to_le_bytes()
                });
            };
            let type_len = u32::try_from(self.types.len()).unwrap();
            let str_len = u32::try_from(self.strings.len()).unwrap();
            put(0); // placeholder for magic, version, flags
            for v in [24, 0, type_len, type_len, str_len] {
                put(v);
            }
            let magic = if self.big_endian {
                MAGIC.to_be_bytes()
            } else {
                MAGIC.to_le_bytes()
            };
            out[..4].copy_from_slice(&[magic[0], magic[1], 1, 0]);
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }

        fn parse(&self) -> KernelBtf {
            KernelBtf::from_bytes(self.build()).unwrap()
        }
    }

    /// `long int`, `char`, `struct file`, `struct linux_binprm { char buf[8];
    /// struct file *file; const char *filename; }`.
    fn binprm() -> Builder {
        let mut b = Builder::new();
        b.int("long int", 8);
        let ch = b.int("char", 1);
        let file = b.strukt("file", 0, &[]);
        let file_ptr = b.ptr(file);
        let const_char = b.raw("", CONST, 0, false, ch);
        let str_ptr = b.ptr(const_char);
        let index = b.int("unsigned int", 4);
        let buf = b.array(ch, index, 8);
        b.strukt(
            "linux_binprm",
            24,
            &[
                ("buf", buf, 0),
                ("file", file_ptr, 64),
                ("filename", str_ptr, 128),
            ],
        );
        b
    }

    fn message(error: &BtfError) -> String {
        error.to_string()
    }

    #[test]
    fn plain_members() {
        let btf = binprm().parse();
        assert_eq!(btf.type_count(), 9);
        assert_eq!(btf.member_offset("linux_binprm", &["buf"]).unwrap(), 0);
        assert_eq!(btf.member_offset("linux_binprm", &["file"]).unwrap(), 8);
        assert_eq!(
            btf.member_offset("linux_binprm", &["filename"]).unwrap(),
            16
        );
        assert_eq!(btf.member_size("linux_binprm", &["buf"]).unwrap(), 8);
        assert_eq!(btf.member_size("linux_binprm", &["file"]).unwrap(), 8);
        assert_eq!(btf.member_size("linux_binprm", &["filename"]).unwrap(), 8);
        assert_eq!(btf.struct_size("linux_binprm").unwrap(), 24);
    }

    #[test]
    fn missing_member_and_struct() {
        let btf = binprm().parse();
        let error = btf.member_offset("linux_binprm", &["filex"]).unwrap_err();
        assert_eq!(message(&error), "struct linux_binprm has no member `filex`");
        let error = btf.member_offset("linux_binprm", &[""]).unwrap_err();
        assert!(matches!(error, BtfError::NoMember { .. }), "{error}");
        let error = btf.member_offset("linux_binprmx", &["file"]).unwrap_err();
        assert_eq!(
            message(&error),
            "no struct or union named `linux_binprmx` in the btf"
        );
        let error = btf.member_offset("linux_binprm", &[]).unwrap_err();
        assert!(matches!(error, BtfError::EmptyPath { .. }), "{error}");
        // A pointer is not descended into.
        let error = btf
            .member_offset("linux_binprm", &["file", "f_inode"])
            .unwrap_err();
        assert_eq!(
            message(&error),
            "`linux_binprm.file` is a pointer, not a struct or union, so the member path cannot go into it"
        );
        // Without a `long` there is no pointer size.
        let mut b = Builder::new();
        let int = b.int("int", 4);
        let p = b.ptr(int);
        b.strukt("s", 8, &[("p", p, 0)]);
        let error = b.parse().member_size("s", &["p"]).unwrap_err();
        assert!(matches!(error, BtfError::NoPointerSize), "{error}");
    }

    #[test]
    fn nested_path() {
        let mut b = Builder::new();
        b.int("long int", 8);
        let int = b.int("unsigned int", 4);
        let mnt = b.strukt("vfsmount", 0, &[]);
        let mnt_ptr = b.ptr(mnt);
        let dentry = b.strukt("dentry", 0, &[]);
        let dentry_ptr = b.ptr(dentry);
        let path = b.strukt(
            "path",
            16,
            &[("mnt", mnt_ptr, 0), ("dentry", dentry_ptr, 64)],
        );
        b.strukt("file", 32, &[("f_mode", int, 0), ("f_path", path, 64)]);
        let btf = b.parse();
        assert_eq!(btf.member_offset("file", &["f_path"]).unwrap(), 8);
        assert_eq!(
            btf.member_offset("file", &["f_path", "dentry"]).unwrap(),
            16
        );
        assert_eq!(btf.member_offset("file", &["f_path", "mnt"]).unwrap(), 8);
        assert_eq!(btf.member_size("file", &["f_path"]).unwrap(), 16);
        let error = btf
            .member_offset("file", &["f_path", "dentryx"])
            .unwrap_err();
        assert_eq!(
            message(&error),
            "struct path (file.f_path) has no member `dentryx`"
        );
        let error = btf.member_offset("file", &["f_mode", "x"]).unwrap_err();
        assert!(
            matches!(&error, BtfError::NotComposite { member, kind: "int" } if member == "file.f_mode"),
            "{error}"
        );
    }

    #[test]
    fn anonymous_members_are_transparent() {
        // struct file { long a; union { struct { int x; struct inode *f_inode; };
        // long y; }; int z; }
        let mut b = Builder::new();
        let long = b.int("long int", 8);
        let int = b.int("int", 4);
        let inode = b.strukt("inode", 0, &[]);
        let inode_ptr = b.ptr(inode);
        let inner = b.strukt("", 16, &[("x", int, 0), ("f_inode", inode_ptr, 64)]);
        let union = b.composite(UNION, "", 16, false, &[("", inner, 0), ("y", long, 0)]);
        // Anonymous members may come through a qualifier too.
        let const_union = b.raw("", CONST, 0, false, union);
        b.strukt(
            "file",
            32,
            &[("a", long, 0), ("", const_union, 64), ("z", int, 192)],
        );
        let btf = b.parse();
        assert_eq!(btf.member_offset("file", &["f_inode"]).unwrap(), 16);
        assert_eq!(btf.member_size("file", &["f_inode"]).unwrap(), 8);
        assert_eq!(btf.member_offset("file", &["x"]).unwrap(), 8);
        assert_eq!(btf.member_offset("file", &["y"]).unwrap(), 8);
        assert_eq!(btf.member_offset("file", &["z"]).unwrap(), 24);
        let error = btf.member_offset("file", &["w"]).unwrap_err();
        assert_eq!(message(&error), "struct file has no member `w`");
    }

    #[test]
    fn typedefs_and_qualifiers_are_followed() {
        // typedef struct { int lock; int owned; } socket_lock_t;
        // struct sock { int sk_x; const volatile socket_lock_t sk_lock; };
        let mut b = Builder::new();
        let int = b.int("int", 4);
        let anon = b.strukt("", 8, &[("lock", int, 0), ("owned", int, 32)]);
        let lock_t = b.typedef("socket_lock_t", anon);
        let volatile = b.raw("", 9, 0, false, lock_t);
        let konst = b.raw("", CONST, 0, false, volatile);
        b.strukt("sock", 12, &[("sk_x", int, 0), ("sk_lock", konst, 32)]);
        // struct socket, also reachable through `typedef struct socket socket_t`.
        let short = b.int("short int", 2);
        let socket = b.strukt("socket", 4, &[("state", short, 0), ("type", short, 16)]);
        b.typedef("socket_t", socket);
        let btf = b.parse();
        assert_eq!(btf.member_offset("sock", &["sk_lock", "owned"]).unwrap(), 8);
        assert_eq!(btf.member_size("sock", &["sk_lock"]).unwrap(), 8);
        assert_eq!(btf.member_offset("socket_lock_t", &["owned"]).unwrap(), 4);
        assert_eq!(btf.struct_size("socket_lock_t").unwrap(), 8);
        assert_eq!(btf.member_offset("socket_t", &["type"]).unwrap(), 2);
        assert_eq!(btf.member_size("socket", &["type"]).unwrap(), 2);
    }

    #[test]
    fn bitfields_and_unaligned_members_are_rejected() {
        let mut b = Builder::new();
        let uint = b.int("unsigned int", 4);
        // kind_flag encoding: bits 24-31 of the offset word give the width.
        b.composite(
            STRUCT,
            "linux_binprm",
            8,
            true,
            &[
                ("have_execfd", uint, (1 << 24) | 3),
                ("point_of_no_return", uint, 1 << 24),
                ("argc", uint, 32),
            ],
        );
        // Legacy encoding: an int type narrower than its storage.
        let narrow = b.int_bits("unsigned int", 4, 3);
        b.strukt(
            "old",
            8,
            &[("flag", narrow, 0), ("odd", uint, 4), ("ok", uint, 32)],
        );
        let btf = b.parse();
        assert_eq!(btf.member_offset("linux_binprm", &["argc"]).unwrap(), 4);
        let error = btf
            .member_offset("linux_binprm", &["point_of_no_return"])
            .unwrap_err();
        assert_eq!(
            message(&error),
            "`linux_binprm.point_of_no_return` is a bitfield (1 bits at bit offset 0), so it has no byte offset"
        );
        let error = btf
            .member_offset("linux_binprm", &["have_execfd"])
            .unwrap_err();
        assert!(
            matches!(
                error,
                BtfError::Bitfield {
                    bits: 1,
                    bit_offset: 3,
                    ..
                }
            ),
            "{error}"
        );
        let error = btf.member_offset("old", &["flag"]).unwrap_err();
        assert!(
            matches!(error, BtfError::Bitfield { bits: 3, .. }),
            "{error}"
        );
        let error = btf.member_offset("old", &["odd"]).unwrap_err();
        assert_eq!(
            message(&error),
            "`old.odd` starts at bit offset 4, which is not byte-aligned"
        );
        assert_eq!(btf.member_offset("old", &["ok"]).unwrap(), 4);
    }

    #[test]
    fn every_kind_is_skipped_by_its_length() {
        let mut b = Builder::new();
        let int = b.int("int", 4);
        let e = b.raw("e", 6, 3, false, 4); // ENUM: 8 * vlen
        for (name, value) in [("A", 0), ("B", 1), ("C", 2)] {
            let off = b.string(name);
            b.word(off);
            b.word(value);
        }
        b.raw("fwd", 7, 0, false, 0);
        let proto = b.raw("", 13, 2, false, int); // FUNC_PROTO: 8 * vlen
        for _ in 0..2 {
            b.word(0);
            b.word(int);
        }
        b.raw("f", 12, 0, false, proto);
        let var = b.raw("v", 14, 0, false, int); // VAR: 4
        b.word(1);
        b.raw(".data", 15, 2, false, 8); // DATASEC: 12 * vlen
        for off in [0, 4] {
            b.word(var);
            b.word(off);
            b.word(4);
        }
        b.raw("double", 16, 0, false, 8);
        b.raw("tag", 17, 0, false, var); // DECL_TAG: 4
        b.word(u32::MAX);
        b.raw("user", 18, 0, false, int);
        b.raw("", 11, 0, false, int);
        b.raw("e64", 19, 2, false, 8); // ENUM64: 12 * vlen
        for _ in 0..2 {
            b.word(0);
            b.word(1);
            b.word(2);
        }
        let last = b.strukt("last", 8, &[("a", int, 0), ("b", e, 32)]);
        let btf = b.parse();
        assert_eq!(btf.type_count(), usize::try_from(last).unwrap());
        assert_eq!(btf.member_offset("last", &["b"]).unwrap(), 4);
        assert_eq!(btf.member_size("last", &["b"]).unwrap(), 4);
        assert_eq!(btf.struct_size("last").unwrap(), 8);
    }

    #[test]
    fn big_endian_blobs_parse() {
        let mut be = Builder {
            big_endian: true,
            ..Builder::new()
        };
        be.int("long int", 8);
        let ch = be.int("char", 1);
        let file = be.strukt("file", 0, &[]);
        let file_ptr = be.ptr(file);
        be.strukt(
            "linux_binprm",
            16,
            &[("buf", ch, 0), ("file", file_ptr, 64)],
        );
        let btf = be.parse();
        assert!(btf.big_endian);
        assert_eq!(btf.member_offset("linux_binprm", &["file"]).unwrap(), 8);
        assert_eq!(btf.member_size("linux_binprm", &["file"]).unwrap(), 8);
    }

    #[test]
    fn duplicate_struct_names() {
        let mut b = Builder::new();
        let int = b.int("int", 4);
        b.strukt("dup", 8, &[("a", int, 0), ("b", int, 32)]);
        b.strukt("dup", 8, &[("a", int, 0), ("b", int, 32)]);
        b.strukt("dup", 0, &[]);
        b.strukt("clash", 8, &[("a", int, 0)]);
        b.strukt("clash", 8, &[("a", int, 32)]);
        let btf = b.parse();
        // Identical copies and an empty stub do not make a lookup ambiguous.
        assert_eq!(btf.member_offset("dup", &["b"]).unwrap(), 4);
        let error = btf.member_offset("clash", &["a"]).unwrap_err();
        assert_eq!(
            message(&error),
            "btf has several types named `clash` that disagree on the offset of `a` (0 and 4)"
        );
        assert!(matches!(
            btf.struct_size("dup").unwrap_err(),
            BtfError::Ambiguous {
                first: 8,
                second: 0,
                ..
            }
        ));
    }

    /// Every struct `Offsets` reads, with the given type for `socket.type`.
    #[expect(
        clippy::too_many_lines,
        reason = "one synthetic kernel: every struct member the programs read, in one place"
    )]
    fn kernel(socket_type_size: u32, with_tgid: bool) -> Builder {
        let mut b = Builder::new();
        let long = b.int("long int", 8);
        let ulong = b.int("long unsigned int", 8);
        let uint = b.int("unsigned int", 4);
        let int = b.int("int", 4);
        let short = b.int("short", socket_type_size);
        let ch = b.int("char", 1);
        let pid_t = b.typedef("pid_t", int);
        let dev_t = b.typedef("dev_t", uint);
        let ushort = b.int("short unsigned int", 2);
        let umode_t = b.typedef("umode_t", ushort);
        let u64_t = b.typedef("u64", ulong);
        let fwd = |b: &mut Builder, name| {
            let id = b.raw(name, 7, 0, false, 0);
            b.ptr(id)
        };
        let sb = b.strukt(
            "super_block",
            64,
            &[
                ("s_list", long, 0),
                ("s_dev", dev_t, 128),
                ("s_magic", ulong, 256),
            ],
        );
        let sb_ptr = b.ptr(sb);
        let inode = b.strukt(
            "inode",
            136,
            &[
                ("i_mode", umode_t, 0),
                ("i_sb", sb_ptr, 320),
                ("i_ino", ulong, 512),
                ("i_rdev", dev_t, 576),
                // v6.12's layout of the content version.
                ("i_size", long, 640),
                ("i_ctime_sec", long, 832),
                ("i_ctime_nsec", uint, 960),
                ("i_generation", uint, 992),
                ("__i_nlink", uint, 1024),
            ],
        );
        let inode_ptr = b.ptr(inode);
        let anon = b.composite(
            UNION,
            "",
            8,
            false,
            &[("f_inode", inode_ptr, 0), ("x", long, 0)],
        );
        let dentry_fwd = fwd(&mut b, "dentry");
        let mnt = fwd(&mut b, "vfsmount");
        let path = b.strukt("path", 16, &[("mnt", mnt, 0), ("dentry", dentry_fwd, 64)]);
        let name_ptr = b.ptr(ch);
        let qstr = b.strukt(
            "qstr",
            16,
            &[("hash_len", u64_t, 0), ("name", name_ptr, 64)],
        );
        b.strukt(
            "dentry",
            192,
            &[
                ("d_parent", dentry_fwd, 192),
                ("d_name", qstr, 256),
                ("d_inode", inode_ptr, 384),
            ],
        );
        let file = b.strukt(
            "file",
            128,
            &[
                ("f_count", long, 0),
                ("", anon, 192),
                ("f_mode", uint, 320),
                ("f_path", path, 448),
            ],
        );
        let kn_fwd = fwd(&mut b, "kernfs_node");
        b.strukt(
            "kernfs_node",
            128,
            &[("parent", kn_fwd, 64), ("id", ulong, 640)],
        );
        let root = b.strukt("cgroup_root", 64, &[("hierarchy_id", int, 160)]);
        let root_ptr = b.ptr(root);
        b.strukt(
            "cgroup",
            1024,
            &[("kn", kn_fwd, 512), ("root", root_ptr, 4096)],
        );
        let file_ptr = b.ptr(file);
        let str_ptr = b.ptr(ch);
        let buf = b.array(ch, uint, 256);
        b.strukt(
            "linux_binprm",
            352,
            &[
                ("file", file_ptr, 448),
                ("filename", str_ptr, 512),
                ("interp", str_ptr, 640),
                ("buf", buf, 768),
            ],
        );
        let task_ptr = fwd(&mut b, "task_struct");
        b.strukt(
            "mm_struct",
            1024,
            &[
                ("arg_start", u64_t, 2048),
                ("arg_end", u64_t, 2112),
                ("env_end", u64_t, 2240),
                ("exe_file", file_ptr, 7168),
            ],
        );
        let mm_ptr = fwd(&mut b, "mm_struct");
        b.strukt("vm_area_struct", 184, &[("vm_file", file_ptr, 1280)]);
        let mut members = vec![
            ("ptrace", uint, 192),
            ("real_parent", task_ptr, 1024),
            ("group_leader", task_ptr, 1152),
            ("start_boottime", u64_t, 1280),
            ("mm", mm_ptr, 1408),
        ];
        if with_tgid {
            members.push(("tgid", pid_t, 960));
        }
        b.strukt("task_struct", 4096, &members);
        let sk = fwd(&mut b, "sock");
        b.strukt(
            "socket",
            48,
            &[("state", int, 0), ("type", short, 32), ("sk", sk, 192)],
        );
        let void_ptr = b.ptr(0);
        b.strukt(
            "msghdr",
            96,
            &[("msg_name", void_ptr, 0), ("msg_namelen", int, 64)],
        );
        let common = b.strukt(
            "sock_common",
            136,
            &[("skc_daddr", uint, 0), ("skc_family", ushort, 128)],
        );
        b.strukt(
            "sock",
            768,
            &[("__sk_common", common, 0), ("sk_protocol", ushort, 4160)],
        );
        b
    }

    #[test]
    fn offsets_resolve() {
        let offsets = Offsets::resolve(&kernel(2, true).parse()).unwrap();
        assert_eq!(
            offsets,
            Offsets {
                linux_binprm_file: 56,
                linux_binprm_filename: 64,
                linux_binprm_interp: 80,
                linux_binprm_buf: 96,
                file_f_inode: 24,
                inode_i_ino: 64,
                inode_i_sb: 40,
                super_block_s_dev: 16,
                task_struct_ptrace: 24,
                task_struct_real_parent: 128,
                task_struct_tgid: 120,
                socket_type: 4,
                socket_sk: 24,
                inode_i_mode: 0,
                inode_i_rdev: 72,
                super_block_s_magic: 32,
                task_struct_group_leader: 144,
                task_struct_start_boottime: 160,
                file_f_path_dentry: 64,
                file_f_mode: 40,
                dentry_d_parent: 24,
                dentry_d_inode: 48,
                cgroup_kn: 64,
                kernfs_node_id: 80,
                kernfs_node_parent: 8,
                cgroup_root: 512,
                cgroup_root_hierarchy_id: 20,
                msghdr_msg_name: 0,
                msghdr_msg_namelen: 8,
                sock_skc_family: 16,
                sock_sk_protocol: 520,
                inode_i_ctime_sec: 104,
                inode_i_ctime_nsec: 120,
                inode_i_size: 80,
                inode_i_generation: 124,
                task_struct_mm: 176,
                mm_struct_exe_file: 896,
                vm_area_struct_vm_file: 160,
                inode_i_nlink: 128,
                dentry_d_name_name: 40,
                mm_struct_arg_start: 256,
                mm_struct_arg_end: 264,
                mm_struct_env_end: 280,
            }
        );
    }

    #[test]
    fn offsets_name_what_failed() {
        let error = Offsets::resolve(&kernel(2, false).parse()).unwrap_err();
        assert_eq!(
            message(&error),
            "failed to resolve `task_struct.tgid` from the kernel btf"
        );
        let source = std::error::Error::source(&error).unwrap().to_string();
        assert_eq!(source, "struct task_struct has no member `tgid`");

        let error = Offsets::resolve(&kernel(4, true).parse()).unwrap_err();
        assert_eq!(
            message(&error),
            "`socket.type` is 4 bytes in this kernel, but the ebpf programs read 2"
        );
    }

    #[test]
    fn malformed_headers() {
        let good = binprm().build();
        let parse = |bytes: &[u8]| KernelBtf::from_bytes(bytes.to_vec()).unwrap_err();

        assert!(matches!(
            parse(&[]),
            BtfError::Truncated { what: "header", .. }
        ));
        let mut bad = good.clone();
        bad[0] = 0;
        assert_eq!(
            message(&parse(&bad)),
            "bad btf magic 0xeb00 at byte 0 (expected 0xeb9f)"
        );
        let mut bad = good.clone();
        bad[2] = 2;
        assert!(matches!(
            parse(&bad),
            BtfError::UnsupportedVersion { version: 2 }
        ));
        let mut bad = good.clone();
        bad[4] = 8;
        assert!(matches!(parse(&bad), BtfError::ShortHeader { hdr_len: 8 }));
        let mut bad = good.clone();
        bad[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            parse(&bad),
            BtfError::SectionOutOfBounds {
                section: "header",
                ..
            }
        ));
        // String section one byte past the end.
        let mut bad = good.clone();
        let str_len = u32::from_le_bytes(bad[20..24].try_into().unwrap()) + 1;
        bad[20..24].copy_from_slice(&str_len.to_le_bytes());
        let error = parse(&bad);
        assert!(
            matches!(
                error,
                BtfError::SectionOutOfBounds {
                    section: "string",
                    ..
                }
            ),
            "{error}"
        );
        // Offsets that overflow u32 arithmetic.
        let mut bad = good.clone();
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        bad[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            parse(&bad),
            BtfError::SectionOutOfBounds {
                section: "type",
                ..
            }
        ));
    }

    #[test]
    fn malformed_type_records() {
        // A struct claiming two members but holding one: the type section
        // ends mid-record.
        let mut b = Builder::new();
        let int = b.int("int", 4);
        b.strukt("s", 8, &[("a", int, 0)]);
        let mut blob = b.build();
        // Patch vlen of the struct (record at type offset 16) to 2.
        blob[24 + 16 + 4] = 2;
        let error = KernelBtf::from_bytes(blob).unwrap_err();
        assert_eq!(
            message(&error),
            "btf type record truncated at byte 40: needs 36 bytes, 24 left"
        );

        // Unknown kind 25.
        let mut b = Builder::new();
        b.int("int", 4);
        b.raw("x", 25, 0, false, 0);
        let error = KernelBtf::from_bytes(b.build()).unwrap_err();
        assert_eq!(message(&error), "btf type 2 at byte 40 has unknown kind 25");

        // A member whose type does not exist, one whose name is outside the
        // string section, a typedef cycle and a self-containing anonymous
        // member: errors at lookup, never panics or hangs.
        let mut b = Builder::new();
        let int = b.int("int", 4);
        b.strukt("dangling", 8, &[("a", 99, 0)]);
        b.typedef("loop_a", 4);
        b.typedef("loop_b", 3);
        b.strukt("cyclic", 8, &[("x", 3, 0)]);
        b.strukt("selfish", 8, &[("", 6, 0), ("b", int, 0)]);
        b.strukt("badname", 8, &[("a", int, 0)]);
        let mut blob = b.build();
        let btf = KernelBtf::from_bytes(blob.clone()).unwrap();
        let error = btf.member_size("dangling", &["a"]).unwrap_err();
        assert_eq!(
            message(&error),
            "btf type id 99 referenced at byte 56 does not exist (the blob has 7 types)"
        );
        let error = btf.member_offset("cyclic", &["x", "y"]).unwrap_err();
        assert!(matches!(error, BtfError::TooDeep { .. }), "{error}");
        let error = btf.member_offset("selfish", &["c"]).unwrap_err();
        assert!(
            matches!(error, BtfError::TooDeep { type_id: 6, .. }),
            "{error}"
        );
        // Point the name of `badname`'s member far past the strings.
        let record = blob.len() - b.strings.len() - 12;
        blob[record..record + 4].copy_from_slice(&0x00ff_ffff_u32.to_le_bytes());
        let btf = KernelBtf::from_bytes(blob).unwrap();
        let error = btf.member_offset("badname", &["a"]).unwrap_err();
        assert_eq!(
            message(&error),
            format!(
                "btf name offset 16777215 read at byte {record} is not a nul-terminated string inside the string section"
            )
        );
    }

    #[test]
    fn truncated_and_corrupted_blobs_never_panic() {
        let mut b = kernel(2, true);
        b.int("long int", 8);
        let good = b.build();
        for len in 0..good.len() {
            assert!(
                KernelBtf::from_bytes(good[..len].to_vec()).is_err(),
                "a {len}-byte prefix parsed"
            );
        }
        // Flip each byte in turn and run every query: only errors, no panics.
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0xff;
            if let Ok(btf) = KernelBtf::from_bytes(bad) {
                let _ = Offsets::resolve(&btf);
                let _ = btf.struct_size("inode");
                let _ = btf.member_size("file", &["f_inode"]);
            }
        }
    }

    #[test]
    fn from_file_names_the_path() {
        let error = KernelBtf::from_file("/nonexistent/vmlinux").unwrap_err();
        assert_eq!(
            message(&error),
            "failed to read btf from `/nonexistent/vmlinux`"
        );
    }

    /// The running kernel's BTF. The machines we develop and test on always
    /// have `/sys/kernel/btf/vmlinux` (`CONFIG_DEBUG_INFO_BTF=y`, as BPF LSM
    /// needs anyway), so its absence is a failure, not a skip.
    fn vmlinux() -> KernelBtf {
        match KernelBtf::from_file(VMLINUX_BTF_PATH) {
            Ok(btf) => btf,
            Err(error) => panic!(
                "this test needs the running kernel's BTF at {VMLINUX_BTF_PATH} \
                 (a kernel built with CONFIG_DEBUG_INFO_BTF=y): {error}"
            ),
        }
    }

    #[test]
    fn running_kernel_offsets() {
        let btf = vmlinux();
        let offsets = Offsets::resolve(&btf).unwrap();
        let size = |name: &str| btf.struct_size(name).unwrap();
        let within = |offset: u32, member_size: u32, name: &str| {
            assert!(
                offset + member_size <= size(name),
                "{offset}+{member_size} beyond struct {name} ({} bytes)",
                size(name)
            );
        };
        assert!(offsets.linux_binprm_file > 0);
        assert!(offsets.inode_i_ino > 0);
        within(offsets.linux_binprm_file, 8, "linux_binprm");
        within(offsets.linux_binprm_filename, 8, "linux_binprm");
        within(offsets.linux_binprm_interp, 8, "linux_binprm");
        within(offsets.linux_binprm_buf, 256, "linux_binprm");
        assert_ne!(offsets.linux_binprm_interp, offsets.linux_binprm_filename);
        within(offsets.file_f_inode, 8, "file");
        within(offsets.inode_i_ino, 8, "inode");
        within(offsets.inode_i_sb, 8, "inode");
        within(offsets.super_block_s_dev, 4, "super_block");
        within(offsets.task_struct_ptrace, 4, "task_struct");
        within(offsets.task_struct_real_parent, 8, "task_struct");
        within(offsets.task_struct_tgid, 4, "task_struct");
        within(offsets.socket_type, 2, "socket");
        within(offsets.socket_sk, 8, "socket");
        within(offsets.msghdr_msg_name, 8, "msghdr");
        within(offsets.msghdr_msg_namelen, 4, "msghdr");
        within(offsets.sock_skc_family, 2, "sock");
        within(offsets.sock_sk_protocol, 2, "sock");
        assert_ne!(offsets.msghdr_msg_name, offsets.msghdr_msg_namelen);
        assert_ne!(offsets.inode_i_ino, offsets.inode_i_sb);
        within(offsets.inode_i_ctime_sec, 8, "inode");
        within(offsets.inode_i_ctime_nsec, 4, "inode");
        within(offsets.inode_i_size, 8, "inode");
        within(offsets.inode_i_generation, 4, "inode");
        within(offsets.task_struct_mm, 8, "task_struct");
        within(offsets.mm_struct_exe_file, 8, "mm_struct");
        within(offsets.vm_area_struct_vm_file, 8, "vm_area_struct");
        within(offsets.inode_i_nlink, 4, "inode");
        within(offsets.dentry_d_name_name, 8, "dentry");
        within(offsets.mm_struct_arg_start, 8, "mm_struct");
        within(offsets.mm_struct_arg_end, 8, "mm_struct");
        within(offsets.mm_struct_env_end, 8, "mm_struct");
        assert!(offsets.mm_struct_env_end > offsets.mm_struct_arg_end);
        assert_ne!(offsets.mm_struct_arg_start, offsets.mm_struct_arg_end);
        assert_ne!(offsets.inode_i_ctime_sec, offsets.inode_i_ctime_nsec);
        assert_ne!(offsets.task_struct_tgid, offsets.task_struct_real_parent);
        // Names the real kernel does not have are clear errors.
        let error = btf.member_offset("linux_binprm", &["filex"]).unwrap_err();
        assert_eq!(message(&error), "struct linux_binprm has no member `filex`");
        // A nested path through an embedded struct agrees with its parts.
        let f_path = btf.member_offset("file", &["f_path"]).unwrap();
        let dentry = btf.member_offset("path", &["dentry"]).unwrap();
        assert_eq!(
            btf.member_offset("file", &["f_path", "dentry"]).unwrap(),
            f_path + dentry
        );
    }

    /// Walks every type of the running kernel's BTF: every name reads, every
    /// referenced type exists, every sized kind has a size, and every named
    /// member of every struct and union is found again by name at the offset
    /// its record gives.
    #[test]
    fn running_kernel_every_type() {
        let btf = vmlinux();
        assert!(btf.type_count() > 10_000, "only {} types", btf.type_count());
        let mut members = 0_usize;
        for index in 0..btf.type_count() {
            let ty = btf.ty_at_index(index).unwrap();
            btf.name(ty.name_off, ty.offset).unwrap();
            if matches!(
                ty.kind,
                Kind::Int
                    | Kind::Ptr
                    | Kind::Array
                    | Kind::Struct
                    | Kind::Union
                    | Kind::Enum
                    | Kind::Enum64
                    | Kind::Float
            ) {
                btf.type_size(ty.id, ty.offset, 0).unwrap();
            }
            if ty.kind.is_modifier() || ty.kind == Kind::Ptr {
                btf.ty(ty.size_or_type, ty.offset + 8).unwrap();
            }
            if !ty.kind.is_composite() {
                continue;
            }
            for i in 0..ty.vlen {
                let record = ty.offset + TYPE_HEADER_LEN + MEMBER_LEN * i;
                let name = btf.name(btf.word(record).unwrap(), record).unwrap();
                btf.ty(btf.word(record + 4).unwrap(), record + 4).unwrap();
                if name.is_empty() {
                    continue;
                }
                let name = std::str::from_utf8(name).unwrap();
                let found = btf.find_member(ty, name, 0).unwrap().unwrap();
                assert_eq!(found.record, record, "member {name} of type {}", ty.id);
                members += 1;
            }
        }
        assert!(members > 30_000, "only {members} members");
    }
}
