//! The vm-bhyve config reader and the typed guest and host config checks, on arbitrary
//! bytes: any input must give a config or an error, never a panic.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use supervisor::conf::{self, Conf};
use supervisor::guest_config::{GuestConfig, GuestConfigError};
use supervisor::host_config::HostConfig;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let parsed = Conf::parse(&text);
    let file = Path::new("fuzz.conf");

    match GuestConfig::from_conf(&parsed, file) {
        Ok(p) => {
            for w in &p.warnings {
                assert!(w.line >= 1, "warning without a line: {w}");
            }
        }
        Err(GuestConfigError::Invalid { errors, .. }) => {
            assert!(!errors.is_empty());
            for e in &errors {
                assert!(e.line >= 1, "error without a line: {e}");
                assert!(e.to_string().starts_with("fuzz.conf:"));
            }
        }
        Err(e) => panic!("parsing text cannot fail to load: {e}"),
    }
    let _ = HostConfig::from_conf(&parsed, Path::new("/etc/vm.conf"), None);

    // Whatever is set through the writer reads back as set.
    if let Some(entry) = parsed.effective_entries().next()
        && let Ok(updated) = conf::set_value(&text, &entry.key, "1")
    {
        assert_eq!(Conf::parse(&updated).get(&entry.key), Some("1"));
    }
});
