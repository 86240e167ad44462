import Testing
@testable import TernDevices

/// The queue code meets what a hostile or buggy guest can put in its rings:
/// every case must end in an error, never in a read or write outside RAM or a hang.
struct VirtqueueTests {
    let ram = TestRAM()

    @Test func takesAChainAndReturnsItThroughTheUsedRing() throws {
        var driver = TestDriverQueue(ram: ram)
        let head = driver.chain([(0x8000, 16, false), (0x9000, 512, true), (0xA000, 1, true)])
        driver.publish(head)
        var queue = SplitVirtqueue(state: driver.state, ram: ram)
        let chain = try #require(try queue.next())
        #expect(chain.head == head)
        #expect(chain.segments.map(\.address) == [0x8000, 0x9000, 0xA000])
        #expect(chain.readable.count == 1 && chain.writable.count == 2)
        #expect(try queue.next() == nil, "one chain was made available")
        try queue.complete(chain.head, written: 513)
        let used = driver.takeUsed()
        #expect(used.count == 1 && used[0].head == head && used[0].written == 513)
        #expect(ram.deviceWrote(driver.used + 2, count: 2), "the used index write is reported for dirty tracking")
        #expect(queue.state.nextAvailable == 1 && queue.state.nextUsed == 1)
    }

    @Test func notificationsAreSuppressedThroughTheUsedRingsFlags() throws {
        let driver = TestDriverQueue(ram: ram)
        let queue = SplitVirtqueue(state: driver.state, ram: ram)
        try queue.suppressNotifications(true)
        #expect(ram.get(UInt16.self, at: driver.used) == 1, "VIRTQ_USED_F_NO_NOTIFY")
        #expect(ram.deviceWrote(driver.used, count: 2))
        try queue.suppressNotifications(false)
        #expect(ram.get(UInt16.self, at: driver.used) == 0)
    }

    @Test func aLoopingChainEndsInAnError() throws {
        var driver = TestDriverQueue(ram: ram, size: 8)
        driver.descriptor(address: 0x8000, length: 16, writable: false, next: 1)
        driver.descriptor(address: 0x8100, length: 16, writable: false, next: 0)
        driver.publish(0)
        var queue = SplitVirtqueue(state: driver.state, ram: ram)
        #expect(throws: VirtqueueError.chainTooLong) { try queue.next() }
    }

    @Test func aDescriptorOutsideRAMIsRefused() throws {
        var driver = TestDriverQueue(ram: ram)
        let head = driver.chain([(0x8000, 16, false), (UInt64(ram.size) - 8, 16, true)])
        driver.publish(head)
        var queue = SplitVirtqueue(state: driver.state, ram: ram)
        #expect(throws: VirtqueueError.descriptorOutsideRAM(index: head + 1, address: UInt64(ram.size) - 8, length: 16)) { try queue.next() }
    }

    @Test func anAddressThatWrapsAroundIsRefused() throws {
        var driver = TestDriverQueue(ram: ram)
        let head = driver.chain([(UInt64.max - 3, 16, false)])
        driver.publish(head)
        var queue = SplitVirtqueue(state: driver.state, ram: ram)
        #expect(throws: VirtqueueError.self) { try queue.next() }
    }

    @Test func headsAndNextIndicesBeyondTheQueueAreRefused() throws {
        let driver = TestDriverQueue(ram: ram, size: 8)
        ram.put(UInt16(9), at: driver.available + 4)
        ram.put(UInt16(1), at: driver.available + 2)
        var queue = SplitVirtqueue(state: driver.state, ram: ram)
        #expect(throws: VirtqueueError.headOutOfRange(9)) { try queue.next() }

        var second = TestDriverQueue(ram: TestRAM(), size: 8)
        second.descriptor(address: 0x8000, length: 16, writable: false, next: 200)
        second.publish(0)
        var other = SplitVirtqueue(state: second.state, ram: second.ram)
        #expect(throws: VirtqueueError.headOutOfRange(200)) { try other.next() }
    }

    @Test func anAvailableIndexThatJumpsPastTheQueueIsRefused() throws {
        let driver = TestDriverQueue(ram: ram, size: 8)
        ram.put(UInt16(100), at: driver.available + 2)
        var queue = SplitVirtqueue(state: driver.state, ram: ram)
        #expect(throws: VirtqueueError.availableIndexJump(from: 0, to: 100)) { try queue.next() }
    }

    @Test func indirectAndMisorderedDescriptorsAreRefused() throws {
        var driver = TestDriverQueue(ram: ram)
        driver.descriptor(address: 0x8000, length: 16, writable: false, flags: 4)
        driver.publish(0)
        var queue = SplitVirtqueue(state: driver.state, ram: ram)
        #expect(throws: VirtqueueError.indirectNotNegotiated) { try queue.next() }

        var second = TestDriverQueue(ram: TestRAM())
        let head = second.chain([(0x8000, 16, true), (0x9000, 16, false)])
        second.publish(head)
        var other = SplitVirtqueue(state: second.state, ram: second.ram)
        #expect(throws: VirtqueueError.writableBeforeReadable) { try other.next() }
    }

    @Test func validationChecksSizeAlignmentAndPlacement() throws {
        var state = TestDriverQueue(ram: ram).state
        try state.validate(maximumSize: 256, in: ram)
        state.size = 12
        #expect(throws: VirtqueueError.badSize(12)) { try state.validate(maximumSize: 256, in: ram) }
        state.size = 512
        #expect(throws: VirtqueueError.badSize(512)) { try state.validate(maximumSize: 256, in: ram) }
        state.size = 16
        state.usedRing = UInt64(ram.size) - 8
        #expect(throws: VirtqueueError.self) { try state.validate(maximumSize: 256, in: ram) }
        state.usedRing = 0x3002
        #expect(throws: VirtqueueError.self) { try state.validate(maximumSize: 256, in: ram) }
        state.ready = false
        try state.validate(maximumSize: 256, in: ram) // a queue not in use is not checked
    }
}
