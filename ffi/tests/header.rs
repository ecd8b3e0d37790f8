//! The committed `include/meshmem.h` must be what cbindgen generates from
//! the sources now. Regenerate it with
//! `MESHMEM_BLESS_HEADER=1 cargo test -p meshmem-ffi --test header`.

use std::path::Path;

#[test]
fn committed_header_matches_the_sources() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml parses");
    let bindings = cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header");
    let mut fresh = Vec::new();
    bindings.write(&mut fresh);
    let fresh = String::from_utf8(fresh).expect("the header is UTF-8");

    let path = crate_dir.join("include/meshmem.h");
    if std::env::var_os("MESHMEM_BLESS_HEADER").is_some() {
        std::fs::write(&path, &fresh).expect("include/meshmem.h is writable");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != fresh {
        let line = committed.lines().zip(fresh.lines()).position(|(a, b)| a != b).unwrap_or(committed.lines().count().min(fresh.lines().count()));
        panic!(
            "{} differs from a fresh cbindgen run, first at line {}; regenerate it with \
             `MESHMEM_BLESS_HEADER=1 cargo test -p meshmem-ffi --test header` and commit it",
            path.display(),
            line + 1
        );
    }
}
