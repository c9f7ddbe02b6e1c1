//! The `dev-fb` process; see the library for what it does.

fn main() -> std::process::ExitCode {
    match dev_fb::run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Before the sandbox, stderr may still be open; after it, the supervisor got the
            // error on the bootstrap channel.
            eprintln!("dev-fb: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
