import Testing
import TernDevices

struct BlockDirtyMapTests {
    @Test func marksOnlyWhileTrackingAndCoversPartialBlocks() {
        let map = BlockDirtyMap(diskSize: 1 << 20 | 512)
        #expect(map.blockCount == 257, "a partial last block counts")
        map.mark(offset: 0, length: 4096)
        #expect(map.dirtyCount == 0, "nothing is recorded before tracking starts")
        map.startTracking()
        map.mark(offset: 4095, length: 2)              // straddles blocks 0 and 1
        map.mark(offset: 1 << 20, length: 512)         // the partial last block
        map.mark(offset: 4096, length: 100)            // block 1 again: counted once
        #expect(map.dirtyCount == 3)
        #expect(map.takeRun(from: 0, maximum: 16) == 0..<2)
        #expect(map.takeRun(from: 0, maximum: 16) == 256..<257)
        #expect(map.takeRun(from: 0, maximum: 16) == nil)
        #expect(map.dirtyCount == 0)
        map.stopTracking()
        map.mark(offset: 0, length: 1 << 20)
        #expect(map.dirtyCount == 0)
    }

    @Test func takesRunsFromACursorAndAtMostMaximumLong() {
        let map = BlockDirtyMap(diskSize: 1 << 30)
        map.startTracking()
        map.mark(offset: 4096 * 60, length: 4096 * 200)     // blocks 60..<260, across words
        map.mark(offset: 4096 * 1000, length: 4096)
        #expect(map.takeRun(from: 100, maximum: 64) == 100..<164, "blocks before the cursor wait")
        #expect(map.takeRun(from: 164, maximum: 1000) == 164..<260)
        #expect(map.takeRun(from: 260, maximum: 1000) == 1000..<1001)
        #expect(map.takeRun(from: 1001, maximum: 1000) == nil)
        #expect(map.dirtyCount == 40, "blocks 60..<100 are still marked")
        #expect(map.takeRun(from: 0, maximum: 1000) == 60..<100)
        // Marked again after being taken: the next round sends it once more.
        map.mark(offset: 4096 * 70, length: 1)
        #expect(map.takeRun(from: 0, maximum: 1000) == 70..<71)
    }
}
