//! The `tollgate` binary: logging set-up and the command line; everything else is in the
//! library.

use clap::Parser;

#[global_allocator]
static ALLOCATOR: Mimalloc = Mimalloc;

/// mimalloc, asked for a plain block whenever its blocks have the alignment asked for
/// anyway: always 8 bytes, and 16 for sizes that are multiples of 16. Its aligned entry
/// point (what the `mimalloc` crate uses for everything) takes a slower path for blocks
/// over 1 KiB and whenever a page's free list runs out: about 13 times a request, 190
/// instructions each.
struct Mimalloc;

/// Whether a plain mimalloc block is aligned enough for `layout`.
fn plain(layout: std::alloc::Layout) -> bool {
    layout.align() <= 8 || (layout.align() <= 16 && layout.size() % 16 == 0)
}

// SAFETY: each function hands mimalloc's own result or pointer straight through; a block
// from either entry point is freed and resized by mimalloc's one free and realloc.
#[allow(unsafe_code)]
unsafe impl std::alloc::GlobalAlloc for Mimalloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys::{mi_malloc, mi_malloc_aligned};
        if plain(layout) {
            mi_malloc(layout.size()).cast()
        } else {
            mi_malloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys::{mi_zalloc, mi_zalloc_aligned};
        if plain(layout) {
            mi_zalloc(layout.size()).cast()
        } else {
            mi_zalloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _: std::alloc::Layout) {
        libmimalloc_sys::mi_free(ptr.cast());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, size: usize) -> *mut u8 {
        use libmimalloc_sys::{mi_realloc, mi_realloc_aligned};
        let grown = std::alloc::Layout::from_size_align_unchecked(size, layout.align());
        if plain(grown) {
            mi_realloc(ptr.cast(), size).cast()
        } else {
            mi_realloc_aligned(ptr.cast(), size, layout.align()).cast()
        }
    }
}

fn main() {
    let cli = tollgate::cli::Cli::parse();
    std::process::exit(tollgate::cli::main(cli));
}
