/* placeholder: the codec lands here */
#include "lmw.h"
