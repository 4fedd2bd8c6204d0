// Stand-in for TVM's tvm/support/serializer.h, missing from the apache-tvm 0.27.0.post1 wheel: see io.h here.
#pragma once

#include <tvm/support/io.h>
