//! COM1: a 16550A UART at [`COM1_PORT`], the guest's serial console.
//!
//! The register logic is `vm-superio`'s [`Serial`]; this file adapts it to the port bus (absolute
//! ports, any access width split into byte accesses as the ISA bus would) and raises
//! [`COM1_GSI`] as an edge through the [`Platform`].

use std::convert::Infallible;
use std::io::Write;
use std::sync::Arc;

use vm_superio::serial::{Error as SerialError, NoEvents};
use vm_superio::{Serial, Trigger};

use super::access::byte_port;
use super::{PioDevice, Platform};
use crate::layout::{COM1_GSI, COM1_PORT};

/// Ports the UART decodes, from [`COM1_PORT`].
const REGISTER_COUNT: u16 = 8;

/// Raises COM1's interrupt line as an edge: the ISA serial interrupt is edge-triggered.
struct Com1Irq(Arc<dyn Platform>);

impl Trigger for Com1Irq {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        self.0.set_irq(COM1_GSI, true);
        self.0.set_irq(COM1_GSI, false);
        Ok(())
    }
}

/// The COM1 UART: guest output goes to the writer given at creation, input comes from
/// [`Com1::enqueue_input`].
pub struct Com1 {
    uart: Serial<Com1Irq, NoEvents, Box<dyn Write + Send>>,
}

impl std::fmt::Debug for Com1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Com1")
            .field("fifo_capacity", &self.uart.fifo_capacity())
            .finish_non_exhaustive()
    }
}

impl Com1 {
    /// A UART in its reset state that raises [`COM1_GSI`] on `platform` and writes the
    /// guest's output to `out`.
    pub fn new(platform: Arc<dyn Platform>, out: Box<dyn Write + Send>) -> Com1 {
        Com1 {
            uart: Serial::new(Com1Irq(platform), out),
        }
    }

    /// Puts `bytes` into the receive FIFO for the guest to read and returns how many fit; the
    /// caller offers the rest again once the guest has drained some. A UART in loopback mode
    /// accepts nothing.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(accepted) => accepted,
            Err(SerialError::FullFifo) => 0,
            Err(e) => {
                tracing::debug!(error = %e, "com1: input not queued");
                0
            }
        }
    }

    /// The register offset of `port`, if the UART decodes it.
    fn offset(port: u16) -> Option<u8> {
        port.checked_sub(COM1_PORT)
            .filter(|&o| o < REGISTER_COUNT)
            .and_then(|o| u8::try_from(o).ok())
    }
}

impl PioDevice for Com1 {
    fn read(&mut self, port: u16, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = if let Some(offset) = byte_port(port, i).and_then(Self::offset) {
                self.uart.read(offset)
            } else {
                tracing::debug!(port, "com1: read outside the UART");
                0xff
            };
        }
    }

    fn write(&mut self, port: u16, data: &[u8]) {
        for (i, &value) in data.iter().enumerate() {
            let Some(offset) = byte_port(port, i).and_then(Self::offset) else {
                tracing::debug!(port, value, "com1: write outside the UART dropped");
                continue;
            };
            if let Err(e) = self.uart.write(offset, value) {
                // The byte is lost; the guest is not told (a real UART's line would not be).
                tracing::debug!(error = %e, "com1: output byte dropped");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::devices::fake_platform::RecordingPlatform;

    const RBR_THR: u16 = COM1_PORT;
    const IER: u16 = COM1_PORT + 1;
    const IIR: u16 = COM1_PORT + 2;
    const LSR: u16 = COM1_PORT + 5;
    const LSR_DATA_READY: u8 = 0x01;
    const IER_RX: u8 = 0x01;

    /// A writer the test can look into after handing it to the UART.
    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A writer whose every write fails.
    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _buf: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("broken"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Err(std::io::Error::other("broken"))
        }
    }

    fn com1() -> (Com1, Arc<RecordingPlatform>, SharedBuf) {
        let platform = Arc::new(RecordingPlatform::default());
        let out = SharedBuf::default();
        let com1 = Com1::new(platform.clone(), Box::new(out.clone()));
        (com1, platform, out)
    }

    fn inb(com1: &mut Com1, port: u16) -> u8 {
        let mut b = [0u8; 1];
        com1.read(port, &mut b);
        b[0]
    }

    #[test]
    fn thr_writes_reach_the_output() {
        let (mut com1, _, out) = com1();
        for &b in b"hi\n" {
            com1.write(RBR_THR, &[b]);
        }
        assert_eq!(*out.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn enqueued_input_is_read_from_rbr_with_data_ready_until_drained() {
        let (mut com1, _, _) = com1();
        assert_eq!(com1.enqueue_input(b"ok"), 2);
        assert_ne!(inb(&mut com1, LSR) & LSR_DATA_READY, 0);
        assert_eq!(inb(&mut com1, RBR_THR), b'o');
        assert_eq!(inb(&mut com1, RBR_THR), b'k');
        assert_eq!(inb(&mut com1, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn input_with_rx_interrupt_enabled_pulses_com1_gsi() {
        let (mut com1, platform, _) = com1();
        com1.write(IER, &[IER_RX]);
        assert!(platform.irqs().is_empty());
        com1.enqueue_input(b"x");
        assert_eq!(platform.irqs(), vec![(COM1_GSI, true), (COM1_GSI, false)]);
        // IIR says "received data available" (0x4) with the FIFO bits set.
        assert_eq!(inb(&mut com1, IIR) & 0x0f, 0x04);
    }

    #[test]
    fn input_with_interrupts_disabled_raises_nothing() {
        let (mut com1, platform, _) = com1();
        com1.enqueue_input(b"x");
        assert!(platform.irqs().is_empty());
    }

    #[test]
    fn full_fifo_accepts_only_what_fits() {
        let (mut com1, _, _) = com1();
        let many = [b'a'; 100];
        let first = com1.enqueue_input(&many);
        assert!(first < many.len());
        assert!(first > 0);
        assert_eq!(com1.enqueue_input(&many), 0);
        inb(&mut com1, RBR_THR);
        assert_eq!(com1.enqueue_input(&many), 1);
    }

    #[test]
    fn wide_access_is_split_into_byte_registers() {
        let (mut com1, _, out) = com1();
        // A 2-byte write at THR: 'A' to THR, 0 to IER.
        com1.write(RBR_THR, &[b'A', 0]);
        assert_eq!(*out.0.lock().unwrap(), b"A");
        // Scratch register (offset 7) round-trips; a 4-byte read from offset 6 runs off the end.
        com1.write(COM1_PORT + 7, &[0x5a]);
        let mut w = [0u8; 4];
        com1.read(COM1_PORT + 6, &mut w);
        assert_eq!(&w[1..], &[0x5a, 0xff, 0xff]);
    }

    #[test]
    fn ports_outside_the_uart_read_all_ones_and_drop_writes() {
        let (mut com1, _, out) = com1();
        assert_eq!(inb(&mut com1, COM1_PORT - 1), 0xff);
        assert_eq!(inb(&mut com1, u16::MAX), 0xff);
        com1.write(0, b"z");
        let mut w = [0u8; 4];
        com1.read(u16::MAX - 1, &mut w);
        assert_eq!(w, [0xff; 4]);
        assert!(out.0.lock().unwrap().is_empty());
    }

    #[test]
    fn failing_output_drops_the_byte_without_panicking() {
        let platform = Arc::new(RecordingPlatform::default());
        let mut com1 = Com1::new(platform, Box::new(Broken));
        com1.write(RBR_THR, b"lost");
        assert_eq!(
            inb(&mut com1, LSR) & 0x60,
            0x60,
            "transmitter still reads empty"
        );
    }
}
