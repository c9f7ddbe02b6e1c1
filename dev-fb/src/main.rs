//! The `dev-fb` process; see the library for what it does.

fn main() -> std::process::ExitCode {
    match dev_fb::run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Before the sandbox, stderr may still be open; after it, the log has the story.
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(inner) = source {
                text.push_str(": ");
                text.push_str(&inner.to_string());
                source = inner.source();
            }
            tracing::error!(error = %text, "dev-fb failed");
            eprintln!("dev-fb: {text}");
            std::process::ExitCode::FAILURE
        }
    }
}
