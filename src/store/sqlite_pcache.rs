//! SQLite's own page cache, wrapped to spare it a walk of every page at every commit.
//!
//! When an insert rebalances sibling pages, SQLite swaps their page numbers through a temporary
//! one, the "pending byte" page (262,145 with 4 KB pages; `balance_nonroot` in sqlite3.c). The
//! default page cache (pcache1) then keeps that as the largest page number it has seen, so at
//! the end of each write transaction, asked to drop the pages past the end of the database, it
//! scans its whole hash table (4,096 slots and ~4,000 pages with subgate's 16 MB cache) instead
//! of the few slots past the end: ~5 % of the ingest writer's time on the listener feed.
//!
//! This wrapper forwards every call to pcache1 and keeps, per cache, an upper bound of the page
//! numbers it holds: every number a page was fetched or moved under, except the temporary one
//! while no page holds it. A truncation with nothing at or past its limit is skipped; any other
//! goes through. A page can only enter the cache by a fetch or a move, both seen here, so a
//! skipped truncation never leaves a page behind that should have gone.
//!
//! It must be installed before SQLite initialises (`install`, from `sqlite_vfs::register`,
//! before any connection opens); when that is too late, SQLite's cache is used as it is.

use std::{
    cell::Cell,
    ffi::{c_int, c_uint, c_void},
    sync::OnceLock,
};

use rusqlite::ffi;

/// SQLite's pending-byte offset; the page holding it is never used for data.
const PENDING_BYTE: u32 = 0x4000_0000;

struct Inner(ffi::sqlite3_pcache_methods2);
// SAFETY: the methods table is plain function pointers and pcache1's argument, set once before
// SQLite initialises and only read afterwards.
unsafe impl Send for Inner {}
unsafe impl Sync for Inner {}

/// SQLite's default page cache, kept before ours is registered: SQLite may call ours (from
/// any thread) as soon as it is.
static DEFAULT: OnceLock<Inner> = OnceLock::new();
/// Whether ours was registered.
static INSTALLED: OnceLock<bool> = OnceLock::new();

/// What the wrapper did on one thread (for tests).
#[doc(hidden)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Truncations skipped: nothing at or past their limit.
    pub skipped: u64,
    /// Truncations passed on to SQLite's cache.
    pub passed: u64,
    /// Pages moved to the temporary page number.
    pub temporary_moves: u64,
}

thread_local! {
    static COUNTS: Cell<Counts> = const {
        Cell::new(Counts { skipped: 0, passed: 0, temporary_moves: 0 })
    };
}

/// What the wrapper did on the calling thread so far.
#[doc(hidden)]
pub fn counts() -> Counts {
    COUNTS.get()
}

fn count(f: impl FnOnce(&mut Counts)) {
    let mut c = COUNTS.get();
    f(&mut c);
    COUNTS.set(c);
}

/// Whether the wrapper is in place (false when SQLite had initialised before `install`).
#[doc(hidden)]
pub fn installed() -> bool {
    INSTALLED.get() == Some(&true)
}

/// Put the wrapper in place, once per process. Must run before SQLite initialises.
pub fn install() -> bool {
    *INSTALLED.get_or_init(|| {
        // SAFETY: sqlite3_config with the documented argument types; SQLite copies the methods
        // table it is given.
        unsafe {
            let mut default: ffi::sqlite3_pcache_methods2 = std::mem::zeroed();
            let got = ffi::sqlite3_config(
                ffi::SQLITE_CONFIG_GETPCACHE2,
                &mut default as *mut ffi::sqlite3_pcache_methods2,
            );
            if got != ffi::SQLITE_OK || default.xCreate.is_none() {
                return false;
            }
            if DEFAULT.set(Inner(default)).is_err() {
                return false;
            }
            let ours = ffi::sqlite3_pcache_methods2 {
                iVersion: default.iVersion,
                pArg: std::ptr::null_mut(),
                xInit: Some(init),
                xShutdown: Some(shutdown),
                xCreate: Some(create),
                xCachesize: Some(cachesize),
                xPagecount: Some(pagecount),
                xFetch: Some(fetch),
                xUnpin: Some(unpin),
                xRekey: Some(rekey),
                xTruncate: Some(truncate),
                xDestroy: Some(destroy),
                xShrink: Some(shrink),
            };
            ffi::sqlite3_config(
                ffi::SQLITE_CONFIG_PCACHE2,
                &ours as *const ffi::sqlite3_pcache_methods2,
            ) == ffi::SQLITE_OK
        }
    })
}

fn inner() -> &'static ffi::sqlite3_pcache_methods2 {
    match DEFAULT.get() {
        Some(Inner(methods)) => methods,
        // Ours are registered only after DEFAULT holds SQLite's.
        None => unreachable!("the page cache wrapper runs only once installed"),
    }
}

/// One page cache (one per connection and database).
struct Cache {
    inner: *mut ffi::sqlite3_pcache,
    /// No page held has a number above this (the temporary page aside).
    max_key: c_uint,
    /// The temporary page number: the pending-byte page for this page size.
    temp_key: c_uint,
    /// A page may be held under `temp_key`.
    temp_held: bool,
}

unsafe fn cache<'a>(p: *mut ffi::sqlite3_pcache) -> &'a mut Cache {
    &mut *(p as *mut Cache)
}

unsafe extern "C" fn init(_: *mut c_void) -> c_int {
    let m = inner();
    m.xInit.map_or(ffi::SQLITE_OK, |x| x(m.pArg))
}

unsafe extern "C" fn shutdown(_: *mut c_void) {
    let m = inner();
    if let Some(x) = m.xShutdown {
        x(m.pArg);
    }
}

unsafe extern "C" fn create(
    page_size: c_int,
    extra: c_int,
    purgeable: c_int,
) -> *mut ffi::sqlite3_pcache {
    let Some(create) = inner().xCreate else {
        return std::ptr::null_mut();
    };
    let made = create(page_size, extra, purgeable);
    if made.is_null() {
        return made;
    }
    let temp_key = PENDING_BYTE / (page_size.max(1) as u32) + 1;
    Box::into_raw(Box::new(Cache {
        inner: made,
        max_key: 0,
        temp_key,
        temp_held: false,
    })) as *mut ffi::sqlite3_pcache
}

unsafe extern "C" fn cachesize(p: *mut ffi::sqlite3_pcache, n: c_int) {
    if let Some(x) = inner().xCachesize {
        x(cache(p).inner, n);
    }
}

unsafe extern "C" fn pagecount(p: *mut ffi::sqlite3_pcache) -> c_int {
    inner().xPagecount.map_or(0, |x| x(cache(p).inner))
}

unsafe extern "C" fn fetch(
    p: *mut ffi::sqlite3_pcache,
    key: c_uint,
    create: c_int,
) -> *mut ffi::sqlite3_pcache_page {
    let c = cache(p);
    let Some(x) = inner().xFetch else {
        return std::ptr::null_mut();
    };
    let page = x(c.inner, key, create);
    if !page.is_null() {
        note(c, key);
    }
    page
}

/// A page is now held under `key`.
fn note(c: &mut Cache, key: c_uint) {
    if key == c.temp_key {
        c.temp_held = true;
    } else if key > c.max_key {
        c.max_key = key;
    }
}

unsafe extern "C" fn unpin(
    p: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    discard: c_int,
) {
    if let Some(x) = inner().xUnpin {
        x(cache(p).inner, page, discard);
    }
}

unsafe extern "C" fn rekey(
    p: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    old: c_uint,
    new: c_uint,
) {
    let c = cache(p);
    if let Some(x) = inner().xRekey {
        x(c.inner, page, old, new);
    }
    // The page that held the temporary number has moved on (SQLite drops any other page under
    // a number before moving one there, so there was only that one).
    if old == c.temp_key && new != c.temp_key {
        c.temp_held = false;
    }
    if new == c.temp_key {
        count(|c| c.temporary_moves += 1);
    }
    note(c, new);
}

unsafe extern "C" fn truncate(p: *mut ffi::sqlite3_pcache, limit: c_uint) {
    let c = cache(p);
    let temp_in_range = c.temp_held && c.temp_key >= limit;
    if c.max_key < limit && !temp_in_range {
        count(|c| c.skipped += 1);
        return;
    }
    count(|c| c.passed += 1);
    if let Some(x) = inner().xTruncate {
        x(c.inner, limit);
    }
    if c.max_key >= limit {
        c.max_key = limit.saturating_sub(1);
    }
    if temp_in_range {
        c.temp_held = false;
    }
}

unsafe extern "C" fn destroy(p: *mut ffi::sqlite3_pcache) {
    let c = Box::from_raw(p as *mut Cache);
    if let Some(x) = inner().xDestroy {
        x(c.inner);
    }
}

unsafe extern "C" fn shrink(p: *mut ffi::sqlite3_pcache) {
    if let Some(x) = inner().xShrink {
        x(cache(p).inner);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{
        config::SqliteSynchronous,
        store::{sqlite::SqliteStore, Record, Store},
    };

    /// Random keys make inserts rebalance index pages, which moves pages through the temporary
    /// number: SQLite's cache would then walk every page at each commit; here the truncation is
    /// skipped, and everything written reads back.
    #[test]
    fn commits_after_rebalancing_skip_the_page_cache_walk_and_lose_nothing() {
        let dir = std::env::temp_dir().join(format!("subgate-pcache-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.db");
        let store = SqliteStore::open(&path, SqliteSynchronous::Full).unwrap();
        store.migrate().unwrap();
        assert!(
            installed(),
            "the wrapper is installed before SQLite initialises"
        );
        let mut rng = fastrand::Rng::with_seed(7);
        let keys: Vec<String> = (0..6_000)
            .map(|_| format!("{:016x}", rng.u64(..)))
            .collect();
        let before = counts();
        for chunk in keys.chunks(200) {
            store
                .write(&mut |tx| {
                    for key in chunk {
                        tx.put_record(&Record {
                            kind: "thing".into(),
                            key: key.clone(),
                            doc: json!({ "key": key, "filler": "x".repeat(300) }),
                            hash: key.clone(),
                            occurred_at: None,
                            changed_at: 1,
                            changed_by: 1,
                            seen_at: 1,
                            seen_by: 1,
                            version: 1,
                        })?;
                    }
                    Ok(())
                })
                .unwrap();
        }
        let after = counts();
        assert!(
            after.temporary_moves > before.temporary_moves,
            "no page went through the temporary number: {after:?}"
        );
        assert!(
            after.skipped >= before.skipped + 30,
            "{before:?} -> {after:?}"
        );
        assert_eq!(after.passed, before.passed, "{before:?} -> {after:?}");
        for key in keys.iter().step_by(97) {
            let found = store.get_record("thing", key).unwrap().expect("written");
            assert_eq!(found.doc["key"], json!(key));
        }
        let conn = rusqlite::Connection::open(&path).unwrap();
        let (count, check): (i64, String) = conn
            .query_row(
                "SELECT (SELECT count(*) FROM records WHERE kind = 'thing'),
                        (SELECT integrity_check FROM pragma_integrity_check)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((count, check.as_str()), (6_000, "ok"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
