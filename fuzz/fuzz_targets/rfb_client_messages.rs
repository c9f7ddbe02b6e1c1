//! Feeds arbitrary client bytes to dev-fb's RFB side: the message parser on its own, and a
//! whole session (handshake, SetPixelFormat with any shifts, SetEncodings, update requests)
//! answering updates over a small framebuffer in every encoding a client can pick. Neither may
//! panic, a parser step must always make progress, and a session's queued output must stay
//! bounded.
//!
//! Input layout: byte 0 sets the chunk size the bytes arrive in (1..=256), byte 1 whether the
//! session asks for VNC Authentication, the rest is what the client sends. A session input
//! that wants to get past the handshake starts with `RFB 003.008\n`, `\x01`, `\x01`.

#![no_main]

use dev_fb::framebuffer::{Screen, TileGrid};
use dev_fb::input::InputQueue;
use dev_fb::message::{MessageReader, Step};
use dev_fb::session::{Context, Session};
use libfuzzer_sys::fuzz_target;
use proto::display::Mode;

const W: u32 = 70;
const H: u32 = 50;

fuzz_target!(|data: &[u8]| {
    let [chunk, auth, rest @ ..] = data else {
        return;
    };
    let chunk = usize::from(*chunk).max(1);

    // The parser alone, fed everything at once.
    let mut reader = MessageReader::default();
    let mut at = 0usize;
    while let Ok(Step::Message(_, n) | Step::Skipped(n)) = reader.next(&rest[at..]) {
        assert!(
            n > 0 && at + n <= rest.len(),
            "a step must make progress inside the input"
        );
        at += n;
    }

    // A whole session, fed in chunks, answering updates after each.
    let fb: Vec<u8> = (0..W * H * 4)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let screen = Screen::new(&fb, Mode::packed(W, H, 32)).expect("the test mode fits");
    let mut grid = TileGrid::new();
    let changed = grid.scan(&screen);
    let dims = grid.dims();
    let mut session = Session::new();
    session.mark_changed(&changed, dims.0, dims.1);
    let mut input = InputQueue::new();
    let mut events = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    for piece in rest.chunks(chunk) {
        pending.extend_from_slice(piece);
        let mut ctx = Context {
            password: (*auth & 1 == 1).then_some(b"secret".as_slice()),
            name: "fuzz",
            size: (W as u16, H as u16),
            input: &mut input,
        };
        match session.receive(&pending, &mut ctx, &mut events) {
            Ok(used) => {
                assert!(used <= pending.len());
                pending.drain(..used);
            }
            Err(_) => return,
        }
        if session.update(&screen, dims).is_err() {
            return;
        }
        // Raw 32 bpp of the whole screen is the largest update; the handshake adds little.
        assert!(session.out.len() < 4 * (W * H * 4) as usize + 4096);
        session.out.clear();
        assert!(pending.len() <= dev_fb::message::MAX_BUFFERED_MESSAGE + chunk);
    }
});
