import Synchronization
import Testing
@testable import TernMachine

final class CapturingConnection: SerialConnection {
    let bytes = Mutex<[UInt8]>([])
    func transmit(_ byte: UInt8) { bytes.withLock { $0.append(byte) } }
}

final class LineRecorder: Sendable {
    let levels = Mutex<[Bool]>([])
    func record(_ level: Bool) { levels.withLock { $0.append(level) } }
    var last: Bool? { levels.withLock { $0.last } }
}

struct SerialTests {
    func out(_ uart: Serial16550, _ offset: UInt16, _ value: UInt8) {
        withUnsafeBytes(of: value) { uart.write(offset: offset, from: $0) }
    }

    func inb(_ uart: Serial16550, _ offset: UInt16) -> UInt8 {
        var value: UInt8 = 0
        withUnsafeMutableBytes(of: &value) { uart.read(offset: offset, into: $0) }
        return value
    }

    @Test func transmitsBytesWrittenToTHR() {
        let sink = CapturingConnection()
        let uart = Serial16550(connection: sink)
        for byte in "hi\n".utf8 { out(uart, 0, byte) }
        #expect(sink.bytes.withLock { $0 } == Array("hi\n".utf8))
        #expect(inb(uart, 5) & 0x60 == 0x60, "transmitter always empty")
    }

    @Test func divisorLatchDoesNotTransmit() {
        let sink = CapturingConnection()
        let uart = Serial16550(connection: sink)
        out(uart, 3, 0x80)      // DLAB on
        out(uart, 0, 0x01)      // divisor low
        out(uart, 1, 0x00)
        #expect(inb(uart, 0) == 0x01)
        out(uart, 3, 0x03)      // DLAB off, 8N1
        #expect(sink.bytes.withLock { $0 }.isEmpty)
        #expect(inb(uart, 3) == 0x03)
    }

    @Test func loopbackFeedsReceiver() {
        let sink = CapturingConnection()
        let uart = Serial16550(connection: sink)
        out(uart, 4, 0x10)      // loopback
        out(uart, 0, 0xAB)
        #expect(inb(uart, 5) & 0x01 == 0x01)
        #expect(inb(uart, 0) == 0xAB)
        #expect(inb(uart, 5) & 0x01 == 0)
        #expect(sink.bytes.withLock { $0 }.isEmpty)
    }

    @Test func transmitInterruptRaisesAndClears() {
        let line = LineRecorder()
        let uart = Serial16550(connection: CapturingConnection()) { line.record($0) }
        out(uart, 4, 0x08)      // OUT2 gates the IRQ
        out(uart, 1, 0x02)      // enable THRE interrupt: pending at once
        #expect(line.last == true)
        #expect(inb(uart, 2) & 0x0F == 0x02)  // IIR: THR empty; reading acknowledges
        #expect(line.last == false)
        #expect(inb(uart, 2) & 0x01 == 0x01)  // nothing pending now
    }

    @Test func receivedBytesRaiseDataInterrupt() {
        let line = LineRecorder()
        let uart = Serial16550(connection: CapturingConnection()) { line.record($0) }
        out(uart, 4, 0x08)
        out(uart, 1, 0x01)      // receive-data interrupt
        uart.receive(Array("ok".utf8))
        #expect(line.last == true)
        #expect(inb(uart, 2) & 0x0F == 0x04)
        #expect(inb(uart, 0) == UInt8(ascii: "o"))
        #expect(inb(uart, 0) == UInt8(ascii: "k"))
        #expect(line.last == false)
    }

    @Test func stateRoundTrips() {
        let uart = Serial16550(connection: CapturingConnection())
        out(uart, 7, 0x5A)
        out(uart, 4, 0x10)
        out(uart, 0, 0x33)
        let state = uart.snapshot()
        let copy = Serial16550(connection: CapturingConnection())
        copy.restore(state)
        #expect(copy.snapshot() == state)
        #expect(inb(copy, 7) == 0x5A)
        #expect(inb(copy, 0) == 0x33)
    }

    @Test(arguments: ["stdout", "off", "file:/tmp/x", "socket:/tmp/s"])
    func parsesSerialTargets(text: String) throws {
        #expect(try SerialTarget(parsing: text).description == text)
    }

    @Test(arguments: ["", "file:", "socket:", "tty", "pty:/dev/x"])
    func rejectsBadSerialTargets(text: String) {
        #expect(throws: ConfigurationError.self) { try SerialTarget(parsing: text) }
    }
}
