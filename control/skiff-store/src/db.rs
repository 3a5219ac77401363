//! Opening the redb files of the store: existing files are checked (readable, ours, right
//! format) and never replaced; new files are created under a temporary name, initialised
//! durably and renamed into place, so a crash never leaves a half-made file at the real path.

use std::{fs, path::Path};

use redb::{
    Database, DatabaseError, ReadableDatabase, StorageError, TableDefinition, TableError,
    WriteTransaction,
};

use crate::{StoreError, error::RedbContext, mvcc::decode_u64};

/// Opens `path`, which must carry `format` under `format_key` in `table`; or, if the file does
/// not exist, creates it with that marker and whatever `init` writes.
pub(crate) fn open_or_create(
    path: &Path,
    table: TableDefinition<&str, &[u8]>,
    format_key: &str,
    format: u64,
    init: impl FnOnce(&WriteTransaction) -> Result<(), StoreError>,
) -> Result<Database, StoreError> {
    if path.exists() {
        open_existing(path, table, format_key, format)
    } else {
        create_new(path, table, format_key, format, init)
    }
}

fn open_existing(
    path: &Path,
    table: TableDefinition<&str, &[u8]>,
    format_key: &str,
    format: u64,
) -> Result<Database, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt {
        path: path.to_path_buf(),
        detail,
    };
    let db = match Database::open(path) {
        Ok(db) => db,
        // A bad magic number comes back as InvalidData: that is a foreign or damaged file.
        Err(DatabaseError::Storage(StorageError::Io(e)))
            if e.kind() != std::io::ErrorKind::InvalidData =>
        {
            return Err(StoreError::Io {
                op: "open",
                path: path.to_path_buf(),
                source: e,
            });
        }
        Err(DatabaseError::DatabaseAlreadyOpen) => {
            return Err(StoreError::Invalid(format!(
                "{} is already open (another skiff-control running with the same data dir?)",
                path.display()
            )));
        }
        Err(e) => return Err(corrupt(e.to_string())),
    };
    let rtx = db.begin_read().op("begin read")?;
    let found = match rtx.open_table(table) {
        Ok(t) => match t.get(format_key).op("read format")? {
            Some(v) => Some(decode_u64(v.value()).ok_or_else(|| corrupt("format marker".into()))?),
            None => None,
        },
        Err(TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(corrupt(e.to_string())),
    };
    if found != Some(format) {
        return Err(StoreError::Foreign {
            path: path.to_path_buf(),
            found,
            expected: format,
        });
    }
    drop(rtx);
    Ok(db)
}

fn create_new(
    path: &Path,
    table: TableDefinition<&str, &[u8]>,
    format_key: &str,
    format: u64,
    init: impl FnOnce(&WriteTransaction) -> Result<(), StoreError>,
) -> Result<Database, StoreError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(StoreError::io("create directory", dir))?;
    let tmp = path.with_extension("creating");
    let _ = fs::remove_file(&tmp);
    {
        let db = Database::create(&tmp).op("create")?;
        let wtx = db.begin_write().op("begin write")?;
        {
            let mut t = wtx.open_table(table).op("create table")?;
            t.insert(format_key, format.to_le_bytes().as_slice())
                .op("write format")?;
        }
        init(&wtx)?;
        wtx.commit().op("commit")?;
    }
    fs::rename(&tmp, path).map_err(StoreError::io("rename into place", path))?;
    // Make the rename itself durable.
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io("sync directory", dir))?;
    Database::open(path).op("open")
}
