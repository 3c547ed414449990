//! A thin VFS over SQLite's own (`unix`): it gathers each commit's WAL frames into one `pwrite`.
//!
//! SQLite writes a WAL frame as two writes, its 24-byte header and then the page, each its own
//! system call: a listener commit of ~27 notifications is ~330 `pwrite`s, a fifth of the ingest
//! writer's time in profiles. Here the WAL file's writes that follow each other are kept in a
//! buffer of up to 124 KiB (about 30 frames) and written at once:
//! - when the page of a *commit frame* has been added (a frame header whose "database size"
//!   field is not zero marks the last frame of a transaction). That happens inside SQLite's
//!   commit, before it publishes the new frames in the WAL index, so no other connection can
//!   look for a frame that is still in the buffer, whatever `synchronous` is;
//! - when the next write would not fit;
//! - before anything that must see the file as written: a read that touches the buffer, a sync,
//!   a truncate, the file's size, a file control, close; and before a write somewhere else (the
//!   order of writes is kept).
//!
//! Only the WAL file is wrapped: the database file and everything else are SQLite's own objects.
//! A failed write is reported to SQLite by the call that made it happen (the commit then fails
//! and nothing is acknowledged), exactly as an unbuffered write failing there would.

use std::{
    cell::Cell,
    ffi::{c_int, c_void, CStr},
    sync::OnceLock,
};

use rusqlite::ffi;

use super::StoreError;

/// The name connections open with.
pub const NAME: &str = "subgate";
const NAME_C: &CStr = c"subgate";

/// A WAL frame header's size; its bytes 4..8 hold the database size after a commit, else zero.
const FRAME_HEADER: usize = 24;
/// The most one write to the wrapped file may carry: SQLite's unix VFS keeps only the low 17
/// bits of a write's length (`nBuf &= 0x1ffff` in `seekAndWriteFd`; its own writes are at most a
/// page), so nothing larger than 124 KiB is handed to it.
const WRITE_MAX: usize = 0x1ffff & !0xfff;
/// A write that would take the buffer past this writes the buffer out first. A larger buffer
/// would save no system call (it would go out in `WRITE_MAX` pieces anyway), only hold memory.
const BUFFER_MAX: usize = WRITE_MAX;

thread_local! {
    /// WAL writes SQLite asked for on this thread, and writes made to the file (for tests).
    static COUNTS: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// (WAL writes SQLite asked for, WAL writes made) on the calling thread so far: a write
/// transaction runs on the thread that calls `Store::write`.
#[doc(hidden)]
pub fn wal_write_counts() -> (u64, u64) {
    COUNTS.get()
}

fn count(requested: u64, issued: u64) {
    COUNTS.set({
        let (r, i) = COUNTS.get();
        (r + requested, i + issued)
    });
}

/// The VFS wrapped (SQLite's default), found once.
struct Inner(*mut ffi::sqlite3_vfs);
// SAFETY: SQLite's VFS objects are immutable after registration and safe to use from any thread.
unsafe impl Send for Inner {}
unsafe impl Sync for Inner {}

static INNER: OnceLock<Result<Inner, String>> = OnceLock::new();

/// Register the VFS (once per process; later calls return the first outcome).
pub fn register() -> Result<(), StoreError> {
    INNER
        .get_or_init(|| {
            // SAFETY: plain SQLite API calls; the registered struct is leaked so it lives as long
            // as the process, as SQLite requires.
            // The page cache wrapper first: it can only be installed before SQLite
            // initialises, which finding a VFS does.
            if !super::sqlite_pcache::install() {
                tracing::debug!("SQLite initialised before subgate: its page cache is used as is");
            }
            unsafe {
                let inner = ffi::sqlite3_vfs_find(std::ptr::null());
                if inner.is_null() {
                    return Err("SQLite has no default VFS".into());
                }
                let mut vfs = *inner;
                vfs.szOsFile = (INNER_OFFSET + (*inner).szOsFile as usize) as c_int;
                vfs.zName = NAME_C.as_ptr();
                vfs.pNext = std::ptr::null_mut();
                vfs.xOpen = Some(open);
                let vfs = Box::leak(Box::new(vfs));
                match ffi::sqlite3_vfs_register(vfs, 0) {
                    ffi::SQLITE_OK => Ok(Inner(inner)),
                    rc => Err(format!("cannot register the SQLite VFS: code {rc}")),
                }
            }
        })
        .as_ref()
        .map(|_| ())
        .map_err(|e| StoreError::Failed(e.clone()))
}

fn inner_vfs() -> *mut ffi::sqlite3_vfs {
    match INNER.get() {
        Some(Ok(Inner(vfs))) => *vfs,
        _ => std::ptr::null_mut(),
    }
}

/// The WAL file as SQLite sees it; the wrapped file follows it in the same allocation.
#[repr(C)]
struct WalFile {
    base: ffi::sqlite3_file,
    buffer: Vec<u8>,
    /// File offset of `buffer[0]`.
    start: i64,
    /// The last write was a commit frame's header: write out after its page.
    commit_next: bool,
}

const INNER_OFFSET: usize = (std::mem::size_of::<WalFile>() + 15) & !15;

unsafe fn wrapped(f: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    (f as *mut u8).add(INNER_OFFSET) as *mut ffi::sqlite3_file
}

unsafe fn methods(
    f: *mut ffi::sqlite3_file,
) -> (&'static ffi::sqlite3_io_methods, *mut ffi::sqlite3_file) {
    let inner = wrapped(f);
    (&*(*inner).pMethods, inner)
}

unsafe extern "C" fn open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let inner = inner_vfs();
    let Some(inner_open) = (if inner.is_null() {
        None
    } else {
        (*inner).xOpen
    }) else {
        return ffi::SQLITE_CANTOPEN;
    };
    if flags & ffi::SQLITE_OPEN_WAL == 0 {
        // Not the WAL: SQLite's own file object, in place.
        return inner_open(inner, name, file, flags, out_flags);
    }
    (*file).pMethods = std::ptr::null();
    let rc = inner_open(inner, name, wrapped(file), flags, out_flags);
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    std::ptr::write(
        file as *mut WalFile,
        WalFile {
            base: ffi::sqlite3_file {
                pMethods: &WAL_METHODS,
            },
            buffer: Vec::new(),
            start: 0,
            commit_next: false,
        },
    );
    ffi::SQLITE_OK
}

/// Write the buffer out (a no-op when it is empty).
unsafe fn flush(f: *mut ffi::sqlite3_file) -> c_int {
    let w = &mut *(f as *mut WalFile);
    if w.buffer.is_empty() {
        return ffi::SQLITE_OK;
    }
    let (m, inner) = methods(f);
    let Some(write) = m.xWrite else {
        w.buffer.clear();
        return ffi::SQLITE_IOERR_WRITE;
    };
    let mut rc = ffi::SQLITE_OK;
    let mut offset = w.start;
    for chunk in w.buffer.chunks(WRITE_MAX) {
        count(0, 1);
        rc = write(
            inner,
            chunk.as_ptr() as *const c_void,
            chunk.len() as c_int,
            offset,
        );
        if rc != ffi::SQLITE_OK {
            break;
        }
        offset += chunk.len() as i64;
    }
    w.buffer.clear();
    rc
}

unsafe extern "C" fn write(
    f: *mut ffi::sqlite3_file,
    data: *const c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    count(1, 0);
    let bytes = std::slice::from_raw_parts(data as *const u8, amount.max(0) as usize);
    let w = &mut *(f as *mut WalFile);
    let follows = offset == w.start + w.buffer.len() as i64;
    if !w.buffer.is_empty() && (!follows || w.buffer.len() + bytes.len() > BUFFER_MAX) {
        let rc = flush(f);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
    }
    let w = &mut *(f as *mut WalFile);
    if w.buffer.is_empty() {
        w.start = offset;
    }
    w.buffer.extend_from_slice(bytes);
    if w.commit_next {
        w.commit_next = false;
        return flush(f);
    }
    if bytes.len() == FRAME_HEADER && bytes[4..8] != [0, 0, 0, 0] {
        w.commit_next = true;
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn read(
    f: *mut ffi::sqlite3_file,
    data: *mut c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    let w = &*(f as *mut WalFile);
    let end = w.start + w.buffer.len() as i64;
    if !w.buffer.is_empty() && offset < end && offset + i64::from(amount) > w.start {
        let rc = flush(f);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
    }
    let (m, inner) = methods(f);
    match m.xRead {
        Some(read) => read(inner, data, amount, offset),
        None => ffi::SQLITE_IOERR_READ,
    }
}

unsafe extern "C" fn close(f: *mut ffi::sqlite3_file) -> c_int {
    let flushed = flush(f);
    let (m, inner) = methods(f);
    let closed = match m.xClose {
        Some(close) => close(inner),
        None => ffi::SQLITE_OK,
    };
    std::ptr::drop_in_place(f as *mut WalFile);
    (*f).pMethods = std::ptr::null();
    if flushed != ffi::SQLITE_OK {
        flushed
    } else {
        closed
    }
}

/// Write the buffer out, then make `call` on the wrapped file: for calls that must see the file
/// as written.
unsafe fn after_flush(
    f: *mut ffi::sqlite3_file,
    call: impl FnOnce(&'static ffi::sqlite3_io_methods, *mut ffi::sqlite3_file) -> c_int,
) -> c_int {
    match flush(f) {
        ffi::SQLITE_OK => {
            let (m, inner) = methods(f);
            call(m, inner)
        }
        rc => rc,
    }
}

unsafe extern "C" fn truncate(f: *mut ffi::sqlite3_file, size: i64) -> c_int {
    after_flush(f, |m, inner| {
        m.xTruncate
            .map_or(ffi::SQLITE_IOERR_TRUNCATE, |x| x(inner, size))
    })
}

unsafe extern "C" fn sync(f: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    after_flush(f, |m, inner| {
        m.xSync.map_or(ffi::SQLITE_IOERR_FSYNC, |x| x(inner, flags))
    })
}

unsafe extern "C" fn file_size(f: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    after_flush(f, |m, inner| {
        m.xFileSize
            .map_or(ffi::SQLITE_IOERR_FSTAT, |x| x(inner, size))
    })
}

unsafe extern "C" fn file_control(f: *mut ffi::sqlite3_file, op: c_int, arg: *mut c_void) -> c_int {
    after_flush(f, |m, inner| {
        m.xFileControl
            .map_or(ffi::SQLITE_NOTFOUND, |x| x(inner, op, arg))
    })
}

unsafe extern "C" fn lock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    let (m, inner) = methods(f);
    m.xLock.map_or(ffi::SQLITE_OK, |x| x(inner, level))
}

unsafe extern "C" fn unlock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    let (m, inner) = methods(f);
    m.xUnlock.map_or(ffi::SQLITE_OK, |x| x(inner, level))
}

unsafe extern "C" fn check_reserved_lock(f: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    let (m, inner) = methods(f);
    m.xCheckReservedLock
        .map_or(ffi::SQLITE_OK, |x| x(inner, out))
}

unsafe extern "C" fn sector_size(f: *mut ffi::sqlite3_file) -> c_int {
    let (m, inner) = methods(f);
    m.xSectorSize.map_or(4096, |x| x(inner))
}

unsafe extern "C" fn device_characteristics(f: *mut ffi::sqlite3_file) -> c_int {
    let (m, inner) = methods(f);
    m.xDeviceCharacteristics.map_or(0, |x| x(inner))
}

unsafe extern "C" fn shm_map(
    f: *mut ffi::sqlite3_file,
    page: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    let (m, inner) = methods(f);
    m.xShmMap.map_or(ffi::SQLITE_IOERR_SHMMAP, |x| {
        x(inner, page, size, extend, out)
    })
}

unsafe extern "C" fn shm_lock(
    f: *mut ffi::sqlite3_file,
    offset: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    let (m, inner) = methods(f);
    m.xShmLock
        .map_or(ffi::SQLITE_IOERR_SHMLOCK, |x| x(inner, offset, n, flags))
}

unsafe extern "C" fn shm_barrier(f: *mut ffi::sqlite3_file) {
    let (m, inner) = methods(f);
    if let Some(x) = m.xShmBarrier {
        x(inner);
    }
}

unsafe extern "C" fn shm_unmap(f: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    let (m, inner) = methods(f);
    m.xShmUnmap.map_or(ffi::SQLITE_OK, |x| x(inner, delete))
}

unsafe extern "C" fn fetch(
    f: *mut ffi::sqlite3_file,
    offset: i64,
    amount: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // The WAL is never memory-mapped by SQLite; forwarded all the same, after a flush.
    after_flush(f, |m, inner| match m.xFetch {
        Some(x) if m.iVersion >= 3 => x(inner, offset, amount, out),
        _ => {
            *out = std::ptr::null_mut();
            ffi::SQLITE_OK
        }
    })
}

unsafe extern "C" fn unfetch(f: *mut ffi::sqlite3_file, offset: i64, page: *mut c_void) -> c_int {
    let (m, inner) = methods(f);
    match m.xUnfetch {
        Some(x) if m.iVersion >= 3 => x(inner, offset, page),
        _ => ffi::SQLITE_OK,
    }
}

static WAL_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(close),
    xRead: Some(read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(sync),
    xFileSize: Some(file_size),
    xLock: Some(lock),
    xUnlock: Some(unlock),
    xCheckReservedLock: Some(check_reserved_lock),
    xFileControl: Some(file_control),
    xSectorSize: Some(sector_size),
    xDeviceCharacteristics: Some(device_characteristics),
    xShmMap: Some(shm_map),
    xShmLock: Some(shm_lock),
    xShmBarrier: Some(shm_barrier),
    xShmUnmap: Some(shm_unmap),
    xFetch: Some(fetch),
    xUnfetch: Some(unfetch),
};
