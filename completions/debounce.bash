# debounce(1) completion for bash: eval "$(debounce completion bash)"
_debounce_command_at() {
    # Complete COMP_WORDS[$1...] as a command line of its own.
    local at=$1 cur=${COMP_WORDS[COMP_CWORD]}
    if declare -F _command_offset >/dev/null; then
        _command_offset "$at"
        return 0
    fi
    if ((COMP_CWORD == at)) && [[ $cur != */* ]]; then
        COMPREPLY=($(compgen -c -- "$cur"))
    else
        _debounce_files  # as for any command without a completion of its own
    fi
}

_debounce_files() {
    local cur=${COMP_WORDS[COMP_CWORD]}
    compopt -o filenames 2>/dev/null  # quoted, and a directory gets its /
    COMPREPLY=($(compgen -f -- "$cur"))
}

_debounce_completion() {
    local IFS=$'
'
    local response completion type value word i sub= at=
    for ((i = 1; i <= COMP_CWORD; i++)); do
        word=${COMP_WORDS[i]}
        if ((i == COMP_CWORD)); then
            # The word being completed: run's COMMAND if it is no option.
            [[ $sub == run && $word != -* ]] && at=$i
            break
        fi
        if [[ -z $sub ]]; then
            [[ $word == -* ]] || sub=$word
            continue
        fi
        if [[ $word == -- ]]; then
            at=$((i + 1))
            break
        fi
        if [[ $sub == run ]]; then
            case $word in
                --delay|--key|--max-wait|--on-busy|--signal|--socket|--stop-timeout|--throttle|--timeout)
                    ((i++))
                    [[ ${COMP_WORDS[i]} == = ]] && ((i++)) ;;
                -*) ;;
                *) at=$i; break ;;
            esac
        fi
    done
    if [[ -n $at && ( $sub == run || $sub == watch ) ]]; then
        _debounce_command_at "$at"
        return 0
    fi

    response=$(env COMP_WORDS="${COMP_WORDS[*]}" COMP_CWORD=$COMP_CWORD \
        _DEBOUNCE_COMPLETE=bash_complete "$1")
    for completion in $response; do
        IFS=',' read -r type value <<< "$completion"
        if [[ $type == dir ]]; then
            COMPREPLY=()
            compopt -o dirnames
        elif [[ $type == file ]]; then
            _debounce_files
        elif [[ $type == plain ]]; then
            printf -v value '%q' "$value"
            COMPREPLY+=("$value")
        fi
    done
    return 0
}

complete -o nosort -F _debounce_completion debounce
