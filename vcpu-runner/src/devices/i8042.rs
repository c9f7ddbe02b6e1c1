//! The i8042 keyboard controller at [`I8042_DATA_PORT`] and [`I8042_COMMAND_PORT`], with no
//! keyboard and no mouse attached.
//!
//! It is here for what guests use it for besides input: the reset line (command `0xFE`, the
//! reboot method of last resort for Linux and most firmware) and a controller that answers
//! Linux's probe (self-test, command byte, port tests) instead of timing out. Bytes meant for a
//! keyboard or mouse are dropped and nothing ever answers them, so no interrupt is raised.
//!
//! The controller has one output byte, as the hardware does: a new answer replaces an unread one.

use std::sync::Arc;

use proto::runner::GuestExit;

use super::{PioDevice, Platform};
use crate::layout::{I8042_COMMAND_PORT, I8042_DATA_PORT};

/// Status: the output buffer holds a byte for the guest.
const STATUS_OUTPUT_FULL: u8 = 0x01;
/// Status: the system flag, set once the controller has passed its self-test (at power-on).
const STATUS_SYSTEM: u8 = 0x04;
/// Status: the last write went to the command port.
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
/// Status: the keyboard is not inhibited (the keylock is open).
const STATUS_NOT_INHIBITED: u8 = 0x10;
/// Status: the output byte came from the auxiliary (mouse) port.
const STATUS_AUX_DATA: u8 = 0x20;

/// Command byte: keyboard interrupt enabled.
const CTR_KBD_INT: u8 = 0x01;
/// Command byte: system flag.
const CTR_SYSTEM: u8 = 0x04;
/// Command byte: auxiliary port clock disabled.
const CTR_AUX_DISABLED: u8 = 0x20;
/// Command byte: keyboard clock disabled.
const CTR_KBD_DISABLED: u8 = 0x10;
/// Command byte: scancode set 2 → set 1 translation.
const CTR_TRANSLATE: u8 = 0x40;
/// The command byte at power-on, as firmware leaves it.
const CTR_DEFAULT: u8 = CTR_KBD_INT | CTR_SYSTEM | CTR_TRANSLATE;

/// The controller's internal RAM; byte 0 is the command byte.
const RAM_BYTES: usize = 32;

/// Commands 0x20..=0x3F read RAM byte `command - 0x20`; 0x60..=0x7F write it.
const CMD_READ_RAM: u8 = 0x20;
const CMD_WRITE_RAM: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xA7;
const CMD_AUX_ENABLE: u8 = 0xA8;
const CMD_AUX_TEST: u8 = 0xA9;
const CMD_SELF_TEST: u8 = 0xAA;
const CMD_KBD_TEST: u8 = 0xAB;
const CMD_KBD_DISABLE: u8 = 0xAD;
const CMD_KBD_ENABLE: u8 = 0xAE;
const CMD_READ_INPUT_PORT: u8 = 0xC0;
const CMD_READ_OUTPUT_PORT: u8 = 0xD0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xD1;
const CMD_KBD_LOOP: u8 = 0xD2;
const CMD_AUX_LOOP: u8 = 0xD3;
const CMD_AUX_SEND: u8 = 0xD4;
/// Commands 0xF0..=0xFF pulse the output lines whose bits are clear; bit 0 is the reset line.
const CMD_PULSE_FIRST: u8 = 0xF0;

/// Self-test passed.
const SELF_TEST_OK: u8 = 0x55;
/// A port's interface test found no fault.
const PORT_TEST_OK: u8 = 0x00;
/// Output port: bit 0 is the (active-low) reset line, bit 1 the A20 gate.
const OUTPUT_PORT_RESET_INACTIVE: u8 = 0x01;
const OUTPUT_PORT_A20: u8 = 0x02;

/// What the next byte written to the data port is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataTarget {
    /// The keyboard, which is not there.
    Keyboard,
    /// Internal RAM byte at this index (index 0: the command byte).
    Ram(usize),
    /// The output port.
    OutputPort,
    /// Echo as if the keyboard sent it.
    KeyboardLoop,
    /// Echo as if the mouse sent it.
    AuxLoop,
    /// The mouse, which is not there.
    Aux,
}

/// The keyboard controller.
pub struct I8042 {
    platform: Arc<dyn Platform>,
    ram: [u8; RAM_BYTES],
    /// The unread output byte and whether it came from the aux port.
    output: Option<(u8, bool)>,
    next_data: DataTarget,
    last_was_command: bool,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042")
            .field("command_byte", &self.command_byte())
            .field("output", &self.output)
            .field("next_data", &self.next_data)
            .finish_non_exhaustive()
    }
}

impl I8042 {
    /// A controller as firmware leaves it: self-test passed, keyboard enabled, nothing pending.
    pub fn new(platform: Arc<dyn Platform>) -> I8042 {
        let mut ram = [0; RAM_BYTES];
        ram[0] = CTR_DEFAULT;
        I8042 {
            platform,
            ram,
            output: None,
            next_data: DataTarget::Keyboard,
            last_was_command: false,
        }
    }

    fn command_byte(&self) -> u8 {
        self.ram.first().copied().unwrap_or(CTR_DEFAULT)
    }

    fn set_command_byte_bits(&mut self, bits: u8, set: bool) {
        if let Some(ctr) = self.ram.first_mut() {
            if set {
                *ctr |= bits;
            } else {
                *ctr &= !bits;
            }
        }
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_SYSTEM | STATUS_NOT_INHIBITED;
        if let Some((_, aux)) = self.output {
            status |= STATUS_OUTPUT_FULL;
            if aux {
                status |= STATUS_AUX_DATA;
            }
        }
        if self.last_was_command {
            status |= STATUS_LAST_WAS_COMMAND;
        }
        status
    }

    fn answer(&mut self, byte: u8) {
        self.output = Some((byte, false));
    }

    fn read_data(&mut self) -> u8 {
        // Nothing pending reads 0: Linux's flush loop and probe stop on a clear OBF anyway.
        self.output.take().map_or(0, |(byte, _)| byte)
    }

    fn reset(&self, why: &str) {
        tracing::info!(why, "i8042: guest pulsed the reset line");
        self.platform.request_exit(GuestExit::Reboot);
    }

    fn command(&mut self, command: u8) {
        self.last_was_command = true;
        self.next_data = DataTarget::Keyboard;
        match command {
            CMD_READ_RAM..=0x3F => {
                let byte = self
                    .ram
                    .get(usize::from(command - CMD_READ_RAM))
                    .copied()
                    .unwrap_or(0);
                self.answer(byte);
            }
            CMD_WRITE_RAM..=0x7F => {
                self.next_data = DataTarget::Ram(usize::from(command - CMD_WRITE_RAM));
            }
            CMD_AUX_DISABLE => self.set_command_byte_bits(CTR_AUX_DISABLED, true),
            CMD_AUX_ENABLE => self.set_command_byte_bits(CTR_AUX_DISABLED, false),
            CMD_AUX_TEST | CMD_KBD_TEST => self.answer(PORT_TEST_OK),
            CMD_SELF_TEST => self.answer(SELF_TEST_OK),
            CMD_KBD_DISABLE => self.set_command_byte_bits(CTR_KBD_DISABLED, true),
            CMD_KBD_ENABLE => self.set_command_byte_bits(CTR_KBD_DISABLED, false),
            CMD_READ_INPUT_PORT => self.answer(0),
            CMD_READ_OUTPUT_PORT => self.answer(OUTPUT_PORT_RESET_INACTIVE | OUTPUT_PORT_A20),
            CMD_WRITE_OUTPUT_PORT => self.next_data = DataTarget::OutputPort,
            CMD_KBD_LOOP => self.next_data = DataTarget::KeyboardLoop,
            CMD_AUX_LOOP => self.next_data = DataTarget::AuxLoop,
            CMD_AUX_SEND => self.next_data = DataTarget::Aux,
            CMD_PULSE_FIRST..=0xFF => {
                if command & OUTPUT_PORT_RESET_INACTIVE == 0 {
                    self.reset("pulse command");
                }
            }
            _ => tracing::debug!(command, "i8042: unknown command ignored"),
        }
    }

    fn data(&mut self, value: u8) {
        self.last_was_command = false;
        let target = std::mem::replace(&mut self.next_data, DataTarget::Keyboard);
        match target {
            DataTarget::Ram(index) => {
                if let Some(byte) = self.ram.get_mut(index) {
                    *byte = value;
                }
            }
            DataTarget::OutputPort => {
                if value & OUTPUT_PORT_RESET_INACTIVE == 0 {
                    self.reset("output port write");
                }
            }
            DataTarget::KeyboardLoop => self.output = Some((value, false)),
            DataTarget::AuxLoop => self.output = Some((value, true)),
            DataTarget::Keyboard | DataTarget::Aux => {
                tracing::debug!(value, ?target, "i8042: byte for an absent device dropped");
            }
        }
    }
}

impl PioDevice for I8042 {
    fn read(&mut self, port: u16, data: &mut [u8]) {
        let value = match (port, data.len()) {
            (I8042_DATA_PORT, 1) => self.read_data(),
            (I8042_COMMAND_PORT, 1) => self.status(),
            _ => {
                tracing::debug!(port, len = data.len(), "i8042: unsupported read");
                0xff
            }
        };
        data.fill(value);
    }

    fn write(&mut self, port: u16, data: &[u8]) {
        match (port, data) {
            (I8042_DATA_PORT, &[value]) => self.data(value),
            (I8042_COMMAND_PORT, &[command]) => self.command(command),
            _ => tracing::debug!(port, len = data.len(), "i8042: unsupported write dropped"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::fake_platform::RecordingPlatform;

    fn i8042() -> (I8042, Arc<RecordingPlatform>) {
        let platform = Arc::new(RecordingPlatform::default());
        (I8042::new(platform.clone()), platform)
    }

    fn inb(dev: &mut I8042, port: u16) -> u8 {
        let mut b = [0u8; 1];
        dev.read(port, &mut b);
        b[0]
    }

    /// A command with an answer, as Linux's `i8042_command` does it: write, wait for OBF, read.
    fn ask(dev: &mut I8042, command: u8) -> Option<u8> {
        dev.write(I8042_COMMAND_PORT, &[command]);
        (inb(dev, I8042_COMMAND_PORT) & STATUS_OUTPUT_FULL != 0).then(|| inb(dev, I8042_DATA_PORT))
    }

    #[test]
    fn idle_controller_has_nothing_pending_and_data_reads_zero() {
        let (mut dev, platform) = i8042();
        let status = inb(&mut dev, I8042_COMMAND_PORT);
        assert_eq!(status & (STATUS_OUTPUT_FULL | 0x02), 0, "OBF and IBF clear");
        assert_eq!(inb(&mut dev, I8042_DATA_PORT), 0);
        assert!(platform.irqs().is_empty());
    }

    #[test]
    fn pulse_reset_command_requests_reboot() {
        let (mut dev, platform) = i8042();
        dev.write(I8042_COMMAND_PORT, &[0xFE]);
        assert_eq!(platform.exits(), vec![GuestExit::Reboot]);
    }

    #[test]
    fn pulse_without_the_reset_bit_and_output_port_with_it_high_do_not_reset() {
        let (mut dev, platform) = i8042();
        dev.write(I8042_COMMAND_PORT, &[0xFF]);
        dev.write(I8042_COMMAND_PORT, &[CMD_WRITE_OUTPUT_PORT]);
        dev.write(I8042_DATA_PORT, &[0x03]);
        assert!(platform.exits().is_empty());
        dev.write(I8042_COMMAND_PORT, &[CMD_WRITE_OUTPUT_PORT]);
        dev.write(I8042_DATA_PORT, &[0x02]);
        assert_eq!(platform.exits(), vec![GuestExit::Reboot]);
    }

    #[test]
    fn self_test_and_interface_tests_answer_success() {
        let (mut dev, _) = i8042();
        assert_eq!(ask(&mut dev, CMD_SELF_TEST), Some(0x55));
        assert_eq!(ask(&mut dev, CMD_KBD_TEST), Some(0x00));
        assert_eq!(ask(&mut dev, CMD_AUX_TEST), Some(0x00));
        assert_eq!(inb(&mut dev, I8042_COMMAND_PORT) & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn command_byte_written_with_0x60_reads_back_with_0x20() {
        let (mut dev, _) = i8042();
        assert_eq!(ask(&mut dev, CMD_READ_RAM), Some(CTR_DEFAULT));
        dev.write(I8042_COMMAND_PORT, &[CMD_WRITE_RAM]);
        dev.write(I8042_DATA_PORT, &[0x47]);
        assert_eq!(ask(&mut dev, CMD_READ_RAM), Some(0x47));
        dev.write(I8042_COMMAND_PORT, &[CMD_AUX_DISABLE]);
        assert_eq!(ask(&mut dev, CMD_READ_RAM), Some(0x47 | CTR_AUX_DISABLED));
    }

    #[test]
    fn aux_loop_echoes_with_the_aux_status_bit() {
        let (mut dev, _) = i8042();
        dev.write(I8042_COMMAND_PORT, &[CMD_AUX_LOOP]);
        dev.write(I8042_DATA_PORT, &[0x5a]);
        let status = inb(&mut dev, I8042_COMMAND_PORT);
        assert_eq!(
            status & (STATUS_OUTPUT_FULL | STATUS_AUX_DATA),
            STATUS_OUTPUT_FULL | STATUS_AUX_DATA
        );
        assert_eq!(inb(&mut dev, I8042_DATA_PORT), 0x5a);
    }

    #[test]
    fn bytes_for_the_absent_keyboard_and_mouse_get_no_answer() {
        let (mut dev, platform) = i8042();
        dev.write(I8042_DATA_PORT, &[0xF2]); // keyboard: identify
        dev.write(I8042_COMMAND_PORT, &[CMD_AUX_SEND]);
        dev.write(I8042_DATA_PORT, &[0xF2]); // mouse: identify
        assert_eq!(inb(&mut dev, I8042_COMMAND_PORT) & STATUS_OUTPUT_FULL, 0);
        assert!(platform.irqs().is_empty());
        assert!(platform.exits().is_empty());
        assert_eq!(
            ask(&mut dev, CMD_READ_RAM),
            Some(CTR_DEFAULT),
            "RAM untouched"
        );
    }

    #[test]
    fn every_command_and_wide_access_is_survived() {
        let (mut dev, platform) = i8042();
        for command in 0..=0xEFu8 {
            dev.write(I8042_COMMAND_PORT, &[command]);
            dev.write(I8042_DATA_PORT, &[0xFF]);
            let _ = inb(&mut dev, I8042_DATA_PORT);
        }
        let mut wide = [0u8; 4];
        dev.read(I8042_DATA_PORT, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        dev.write(I8042_COMMAND_PORT, &[0xFE, 0, 0, 0]);
        dev.read(0x61, &mut wide[..1]);
        assert_eq!(wide[0], 0xff);
        assert!(
            platform.exits().is_empty(),
            "a wide 0xFE write is not a command"
        );
    }
}
