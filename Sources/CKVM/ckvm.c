// Intentionally empty: SwiftPM needs one source file for a C target; the shim
// is header-only (see include/ckvm.h).
#include "ckvm.h"
