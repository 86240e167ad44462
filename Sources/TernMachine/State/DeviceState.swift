import TernWire

/// Wire encoding of the device states (one section per device).
extension Serial16550.State {
    static let tag = "UART"

    var section: StateSection {
        var w = WireWriter(capacity: 32)
        for byte in [divisorLow, divisorHigh, interruptEnable, fifoControl, lineControl, modemControl, scratch] { w.write(byte) }
        w.write(UInt8(transmitInterruptPending ? 1 : 0))
        w.writeBlob(receiveFIFO)
        return StateSection(tag: Self.tag, version: Self.version, body: w.bytes)
    }

    init(section: StateSection) throws(WireError) {
        guard section.version == Self.version else {
            throw .unsupportedVersion("UART state version \(section.version) (this tern reads \(Self.version))")
        }
        var r = WireReader(section.body, context: "UART state")
        self.init()
        divisorLow = try r.read(); divisorHigh = try r.read(); interruptEnable = try r.read()
        fifoControl = try r.read(); lineControl = try r.read(); modemControl = try r.read(); scratch = try r.read()
        transmitInterruptPending = try r.read(UInt8.self) != 0
        receiveFIFO = try r.readBlob(maximum: Serial16550.fifoCapacity)
        try r.expectEnd()
    }
}
