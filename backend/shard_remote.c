/* shard_remote.c -- placeholder until implemented. */
#include "shard_remote.h"
